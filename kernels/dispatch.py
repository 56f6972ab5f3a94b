"""One dispatch point for the numerics of packed modules.

The torch reference (``reference.dequantize``) runs everywhere and defines the results; device fast paths
register here and are chosen only for tensors they support. Falling back where a fast path was expected is
logged once, loudly, so a slow model is never a silent surprise.
"""

from __future__ import annotations

import logging
import os

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


MODES = ("auto", "reference")


def kernel_mode() -> str:
    """``HF_COMPRESS_KERNELS``: ``auto`` (default: fast paths where they apply) or ``reference`` (dequantize with the
    torch reference and multiply in the activations' dtype: exact, slow; what the round-trip tests compare)."""
    mode = os.environ.get("HF_COMPRESS_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"HF_COMPRESS_KERNELS={mode!r}: choose one of {MODES}")
    return mode


def packed_linear(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` without a bias, by the fastest path that serves ``module`` on ``x``'s device.

    CPU: the segment kernels of ``cpu_linear`` (bf16 compute, repacked once at the first call). CUDA: the fused
    Triton dequantize-matmul up to ``CUDA_FUSED_MAX_ROWS`` rows, dequantize + cuBLAS above. ``reference`` mode, or autograd through the input (fine-tuning), takes
    the reference dequantize: the fast ops have no backward. Runs once per module per token, so the checks are
    ordered cheapest first."""
    if (x.requires_grad and torch.is_grad_enabled()) or kernel_mode() == "reference":
        return torch.nn.functional.linear(x, dequantize(module, x.dtype))
    if module.weight.is_cuda:
        return _cuda_linear(module, x)
    if not module.weight.is_cpu:
        return torch.nn.functional.linear(x, dequantize(module, x.dtype))
    cpu_plan(module)
    return module.__dict__["_cpu_plan"][3](x).to(x.dtype)


def fast_cpu_forward(module, x: torch.Tensor):
    """The CPU kernel's result when the module's plan is current and the fast path applies, else ``None`` (the
    caller then takes :func:`packed_linear`). The checks of ``packed_linear`` with nothing else around them."""
    cached = module.__dict__.get("_cpu_plan")
    if not _is_current(cached, module._buffers["weight"]) or (x.requires_grad and torch.is_grad_enabled()):
        return None
    if os.environ.get("HF_COMPRESS_KERNELS", "auto") not in ("auto", ""):
        return None
    return cached[3](x).to(x.dtype)


# Rows up to which the fused Triton kernel serves a call on CUDA; above, dequantize + cuBLAS. Measured once on an
# H200 (benchmarks/RESULTS.md "GPU kernels"): both paths are launch-bound there (~30 µs a call at every M from 1 to
# 512) and the fused kernel never won, so this value is unsupported either way; kept until a graph-captured decode
# makes the kernels' own time visible.
CUDA_FUSED_MAX_ROWS = 64


def _cuda_linear(module, x: torch.Tensor) -> torch.Tensor:
    try:
        from hf_compress.kernels.triton_matmul import packed_matmul_triton
    except ImportError as exc:
        _warn_once("triton-import", f"hf-compress: Triton unavailable ({exc}); using the slow torch dequantize")
        return torch.nn.functional.linear(x, dequantize(module, x.dtype))
    if x.numel() // max(x.shape[-1], 1) <= CUDA_FUSED_MAX_ROWS and x.dtype in (torch.float16, torch.bfloat16,
                                                                                torch.float32):
        return packed_matmul_triton(module, x)
    return torch.nn.functional.linear(x, dequantize(module, x.dtype))


def _is_current(cached, weight) -> bool:
    """A cached ``(weight, version, plan, runner)`` still describes ``weight`` (same tensor, not written since)."""
    return cached is not None and cached[0] is weight and cached[1] == weight._version


def cpu_plan(module):
    """The module's CPU kernel plan, built at the first call and rebuilt if its ``weight`` buffer was replaced or
    written in place (a later ``load_state_dict``); kept outside the state dict, so checkpoints do not change."""
    cached = module.__dict__.get("_cpu_plan")
    weight = module.weight
    if not _is_current(cached, weight):
        from hf_compress.kernels.cpu_linear import build_plan

        plan = build_plan(module)
        cached = (weight, weight._version, plan, plan.runner(module))
        module.__dict__["_cpu_plan"] = cached
        if plan.fallback_reasons:
            _warn_once(f"dense:{'; '.join(plan.fallback_reasons)}", f"hf-compress: modules like {type(module).__name__}("
                       f"{module.extra_repr()}) keep a dense bf16 copy of {len(plan.fallback_reasons)} segment(s): "
                       f"{'; '.join(plan.fallback_reasons)} (`hf_compress.kernel_report(model)` lists every module)")
    return cached[2]


__all__ = ["dequantize", "dequantize_reference", "kernel_mode", "packed_linear", "fast_cpu_forward", "cpu_plan"]
