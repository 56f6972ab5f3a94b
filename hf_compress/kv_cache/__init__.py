"""Per-layer quantized KV caches for ``generate()``: KIVI axes, packed codes, a plan per decoder layer.

Generic: methods (a searched plan, a low-rank cache) build on these pieces; nothing here names a method.
"""

from hf_compress._imports import lazy_attributes

_LAZY = {
    "KVPlan": "plan", "build_cache": "plan", "cache_bytes": "plan", "pair_name": "quantizer", "PAIR_NAMES": "plan",
    "QuantizedKVLayer": "layers", "QuantizedStream": "layers", "QuantizedBlocks": "quantizer", "fake_quantize": "quantizer",
    "check_kv_bits": "quantizer", "KV_BITS": "quantizer", "PlannedCacheMixin": "generation",
}
__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
