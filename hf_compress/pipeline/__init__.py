"""The pipeline that runs the stages for every quantization method: calibrate → score → allocate → solve → pack,
and the ``HfQuantizer`` that makes the result a native transformers checkpoint (save/load)."""

from hf_compress.pipeline.quantize import HfcQuantizer, attach_quantizer, quantize

__all__ = ["HfcQuantizer", "attach_quantizer", "quantize"]
