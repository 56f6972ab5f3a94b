"""One dispatch point for the numerics of packed modules.

The torch reference (``reference.dequantize``) runs everywhere and defines the results; device fast paths
register here and are chosen only for tensors they support. Falling back where a fast path was expected is
logged once, loudly, so a slow model is never a silent surprise.
"""

from __future__ import annotations

import logging

import torch

from hf_compress.kernels.reference import dequantize_reference

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg)


def dequantize(module, dtype=torch.float32) -> torch.Tensor:
    """Dense weight ``[out, in]`` of a ``PackedLinear`` in ``dtype``."""
    if module.weight.is_cuda:
        try:
            from hf_compress.kernels.triton_dequant import dequantize_triton
        except ImportError as exc:  # triton missing on a CUDA machine
            _warn_once("triton-import", f"hf-compress: Triton unavailable ({exc}); using the slow torch dequantize")
        else:
            return dequantize_triton(module, dtype)
    return dequantize_reference(module, dtype)


__all__ = ["dequantize", "dequantize_reference"]
