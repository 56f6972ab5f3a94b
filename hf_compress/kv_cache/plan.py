"""A per-layer KV precision plan and the ``Cache`` built from it.

The plan is plain JSON (``{"key_bits": [...], "value_bits": [...], "group_size": 32, "residual_length": 32}``),
so it can live in a model's ``config.json`` and be turned back into a cache by ``generate()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hf_compress.kv_cache.quantizer import check_kv_bits, pair_name

PAIR_NAMES = {"KV16": (16, 16), "KV8": (8, 8), "K8V4": (8, 4), "K4V8": (4, 8), "KV4": (4, 4), "K4V2": (4, 2),
              "K2V4": (2, 4), "KV2": (2, 2), "K8V2": (8, 2), "K16V8": (16, 8), "K16V4": (16, 4)}


@dataclass
class KVPlan:
    """Key and value widths for every decoder layer (16 = untouched).

    Args:
        key_bits: one width per layer, each 2, 4, 8 or 16.
        value_bits: likewise, same length.
        group_size: KIVI group (tokens per key group, channels per value group).
        residual_length: newest tokens kept in full precision.
    """

    key_bits: list[int]
    value_bits: list[int]
    group_size: int = 32
    residual_length: int = 32
    extra: dict = field(default_factory=dict)  # provenance (search budget, sensitivities); not used to build caches

    def __post_init__(self):
        if not isinstance(self.key_bits, (list, tuple)) or not isinstance(self.value_bits, (list, tuple)):
            raise TypeError("KVPlan key_bits and value_bits must be lists of per-layer widths")
        self.key_bits = [check_kv_bits(b, f"key bits of layer {i}") for i, b in enumerate(self.key_bits)]
        self.value_bits = [check_kv_bits(b, f"value bits of layer {i}") for i, b in enumerate(self.value_bits)]
        if len(self.key_bits) != len(self.value_bits):
            raise ValueError(f"KVPlan has {len(self.key_bits)} key widths but {len(self.value_bits)} value widths")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        if isinstance(self.residual_length, bool) or not isinstance(self.residual_length, int) or self.residual_length < 0:
            raise ValueError(f"residual_length must be a non-negative integer, got {self.residual_length!r}")

    @classmethod
    def uniform(cls, num_layers: int, key_bits: int, value_bits: int | None = None, **kwargs) -> "KVPlan":
        value_bits = key_bits if value_bits is None else value_bits
        return cls([key_bits] * num_layers, [value_bits] * num_layers, **kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> "KVPlan":
        if not isinstance(data, dict):
            raise TypeError(f"a KV plan must be a dict, got {type(data).__name__}")
        unknown = set(data) - {"key_bits", "value_bits", "group_size", "residual_length", "extra"}
        if unknown:
            raise ValueError(f"unknown KV plan fields {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def num_layers(self) -> int:
        return len(self.key_bits)

    @property
    def average_bits(self) -> float:
        """Mean nominal width of K and V over layers (codes only, as KVTuner counts it)."""
        return sum(self.key_bits + self.value_bits) / (2 * self.num_layers)

    def pairs(self) -> list[str]:
        return [pair_name(k, v) for k, v in zip(self.key_bits, self.value_bits)]

    def check_model(self, config) -> None:
        """Raise unless this plan fits ``config`` (a transformers config): one entry per full-attention layer."""
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layers = text.num_hidden_layers
        if self.num_layers != layers:
            raise ValueError(f"the KV plan has {self.num_layers} layers but the model has {layers} decoder layers")
        layer_types = getattr(text, "layer_types", None) or []
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise ValueError(f"per-layer quantized KV caches support full-attention layers only; the model has {other}")
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if any(b < 16 for b in self.value_bits) and head_dim % self.group_size:
            raise ValueError(f"head_dim {head_dim} is not a multiple of group_size {self.group_size} (values are "
                             "quantized in groups of channels)")


def build_cache(plan: KVPlan | dict, config=None):
    """A transformers ``Cache`` with one :class:`QuantizedKVLayer` per decoder layer, for ``generate(cache=...)``
    (``past_key_values=`` before transformers 5.24). With ``config``, the plan is checked against the model."""
    from transformers.cache_utils import Cache

    from hf_compress.kv_cache.layers import QuantizedKVLayer

    plan = KVPlan.from_dict(plan) if isinstance(plan, dict) else plan
    if config is not None:
        plan.check_model(config)
    return Cache(layers=[QuantizedKVLayer(k, v, plan.group_size, plan.residual_length)
                         for k, v in zip(plan.key_bits, plan.value_bits)])


def cache_bytes(cache) -> int:
    """Bytes a cache really holds: our layers report packed codes + scales + tail; other layers (``DynamicLayer``,
    transformers' quantized layers) are measured from the tensors they keep."""
    return sum(_layer_bytes(layer) for layer in getattr(cache, "layers", []))


def _layer_bytes(layer) -> int:
    if hasattr(layer, "nbytes") and callable(layer.nbytes):
        return int(layer.nbytes())
    seen: set[int] = set()
    return sum(_tensor_bytes(getattr(layer, name, None), seen)
               for name in ("keys", "values", "_quantized_keys", "_quantized_values"))


def _tensor_bytes(obj, seen: set[int]) -> int:
    import torch

    if obj is None or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        inner = [getattr(obj, n) for n in ("_data", "_scale", "_shift") if isinstance(getattr(obj, n, None), torch.Tensor)]
        if inner:  # quanto QTensor subclasses: count their parts, not the logical shape
            return sum(_tensor_bytes(t, seen) for t in inner)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(t, seen) for t in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(t, seen) for t in obj.values())
    return 0
