"""``prune(model, config)``: the pruning configs' pipeline stage, on the quantizers' calibration runner.

Stages: calibrate (``calibration_batches``) → plan (``config.resolve_plan``; ECoFLaP allocates here) → solve block by
block with ``run_sequential`` (the same Hessians ``H = 2/N Σ x xᵀ`` GPTQ uses; later modules see the pruned outputs
of earlier ones) → store each module as a ``SparseLinear`` → attach the quantizer so ``save_pretrained`` writes a
checkpoint ``from_pretrained`` loads natively. ``hf_compress.quantize`` lands here for every pruning config.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_compress.calibration.discovery import set_submodule, weight_matrix
from hf_compress.calibration.runner import run_sequential
from hf_compress.formats.linear import PackedLinear
from hf_compress.formats.sparse import SparseLinear, SparseSpec
from hf_compress.pipeline.quantize import (_packed_from, _untie_head, attach_quantizer, calibration_windows,
                                           cast_dense_parts)


def check_not_compressed(model: nn.Module) -> None:
    """Pruning reads dense weights: a quantized or pruned model is refused (2:4 + 4-bit is one config instead)."""
    compressed = [n for n, m in model.named_modules() if isinstance(m, (PackedLinear, SparseLinear))]
    if (getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is not None) or compressed:
        raise ValueError("model is already quantized or pruned (e.g. "
                         f"{compressed[0] if compressed else type(model).__name__}); prune the dense model — for sparse "
                         "+ integer codes set `bits` on the pruning config (e.g. WandaConfig(pattern='2:4', bits=4))")


def prune(model: nn.Module, config, calibration=None, tokenizer=None, progress: bool = True) -> nn.Module:
    """Prune ``model`` in place as ``config`` (a ``SparseConfig``) says and return it, ready to save natively."""
    check_not_compressed(model)
    config.check_model(model)
    start = time.perf_counter()
    batches = calibration_windows(model, config, calibration, tokenizer)
    token_weights = config.token_weights()
    config.prepare_model(model)
    plan = config.resolve_plan(model, batches)
    modules = dict(model.named_modules())
    for name, spec in plan.items():
        if isinstance(spec, SparseSpec):
            spec.check_shape(name, *weight_matrix(modules[name]).shape)
    report: dict[str, dict] = {}

    def solve(name, module, stats):
        return _sparse_from(name, module, config, plan[name], None if stats is None else stats.hessian, report)

    sparse = [n for n, s in plan.items() if isinstance(s, SparseSpec)]
    packed = [n for n in plan if n not in sparse]
    if packed:
        _untie_head(model)
    if config.needs_calibration:
        run_sequential(model, batches, lambda name, _m: name in sparse, solve, progress=progress,
                       token_weights=token_weights)
    else:
        for name in tqdm(sparse, desc="Pruning modules", disable=not progress):
            set_submodule(model, name, solve(name, model.get_submodule(name), None))
    for name in packed:  # head / embeddings: weight-only round-to-nearest, as in the quantization pipeline
        set_submodule(model, name, _packed_from(name, model.get_submodule(name), config, plan, None, report,
                                                weight_only=True))
    missing = [n for n in sparse if not isinstance(model.get_submodule(n), SparseLinear)]
    if missing:
        raise ValueError(f"planned modules were never pruned (not reached by calibration?): {missing[:5]}")
    if config.dense_dtype is not None:  # values and factors follow it; grid scales keep their stored precision
        scales = {m: m.scales for m in model.modules() if isinstance(m, SparseLinear) and hasattr(m, "scales")}
        cast_dense_parts(model, getattr(torch, config.dense_dtype))
        for module, tensor in scales.items():
            module.scales = tensor
    config.plan = {k: v.to_dict() for k, v in plan.items()}
    total = sum(weight_matrix(modules[n]).numel() for n in sparse)
    kept = sum(plan[n].kept(*weight_matrix(modules[n]).shape) for n in sparse)
    config.report = {"seconds": round(time.perf_counter() - start, 2), "sparsity": round(1 - kept / max(total, 1), 6),
                     "pruned_weights": total - kept, "planned_weights": total, "modules": report}
    attach_quantizer(model, config)
    return model


def _sparse_from(name: str, module: nn.Module, config, spec: SparseSpec, hessian, report: dict) -> SparseLinear:
    W = weight_matrix(module).detach()
    if not torch.isfinite(W).all():
        raise ValueError(f"weights of {name} contain NaN or inf; refusing to prune them")
    result = config.prune_weight(W, hessian, spec)
    bias = getattr(module, "bias", None)
    sparse = SparseLinear.from_dense(result.weight, result.mask, spec, None if bias is None else bias.detach(),
                                     factors=getattr(result, "factors", None), dtype=W.dtype)
    report[name] = {"output_error": result.output_error}
    return sparse.to(W.device)
