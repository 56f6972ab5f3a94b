"""``quantize(model, config, calibration)``: the one pipeline every method runs through.

plan (which module gets which grid) → calibration (only for methods that need data) → per-module solver →
``PackedLinear`` in place → the config, now holding the plan and a report, attached as the model's
``quantization_config`` so that ``save_pretrained`` writes a checkpoint that loads natively.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration.data import calibration_batches
from .calibration.discovery import decoder_layers, set_submodule, unsupported_weight_modules, weight_matrix
from .calibration.runner import run_sequential
from .config import HfcConfig
from .formats.linear import PackedLinear

logger = logging.getLogger(__name__)


def _bias_of(module: nn.Module):
    return None if getattr(module, "bias", None) is None else module.bias.detach()


def _packed_from(name: str, module: nn.Module, config: HfcConfig, plan: dict, stats, report: dict) -> PackedLinear:
    W = weight_matrix(module).detach()
    if not torch.isfinite(W).all():
        raise ValueError(f"weights of {name} contain NaN or inf; refusing to quantize them")
    result = config.solve(W, stats, plan[name], name=name)
    spec = result.spec or plan[name]
    if spec.is_mixed and spec != plan[name]:
        raise ValueError(f"{name}: the solver stored bit groups {spec.bit_groups}, the plan asked for {plan[name].bit_groups}")
    packed = PackedLinear.from_codes(result.codes, result.scales, result.zeros, spec, _bias_of(module), result.col_bits)
    packed.to(W.device)
    report[name] = {"output_error": result.output_error}
    return packed


def quantize(model: nn.Module, config: HfcConfig, calibration=None, tokenizer=None, progress: bool = True) -> nn.Module:
    """Quantize ``model`` in place with ``config`` and return it.

    Args:
        model: a transformers causal LM (any architecture whose decoder blocks sit in one ``ModuleList``).
        config: an :class:`HfcConfig` subclass instance (e.g. ``GPTQConfig(bits=4, group_size=64)``).
        calibration: calibration source or :class:`CalibrationSpec`; defaults to ``config.dataset``.
            Ignored by methods that need no data.
        tokenizer: tokenizer for the calibration text (default: loaded from ``model.name_or_path``).
    """
    if not isinstance(config, HfcConfig):
        raise TypeError(f"config must be an hf-compress config (e.g. GPTQConfig), got {type(config).__name__}")
    if getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is not None:
        raise ValueError("model is already quantized; load the dense model to quantize it again")
    start = time.perf_counter()
    batches = None
    if config.needs_calibration:
        spec = config.calibration_spec(calibration)
        if spec is None:
            raise ValueError(f"{type(config).__name__} needs calibration data: pass `calibration=` or set `dataset=`")
        batches = calibration_batches(spec, tokenizer or _tokenizer_for(model, config))
    if config.token_weighting and not config.solver_needs_statistics:
        raise ValueError(f"token_weighting={config.token_weighting!r} weights calibration Hessians; "
                         f"{type(config).__name__} with this solver uses none")
    if config.rotate:
        from .rotation import rotate_model

        rotate_model(model, config.rotation_seed)
    plan = config.resolve_plan(model, batches)
    _, layers = decoder_layers(model)
    skipped = unsupported_weight_modules(layers)
    if skipped:
        logger.warning("hf-compress: %d modules have weights no solver handles and stay dense: %s", len(skipped), skipped)
    report: dict[str, dict] = {}

    def solve(name, module, stats):
        return _packed_from(name, module, config, plan, stats, report)

    if config.solver_needs_statistics:
        weights = None
        if config.token_weighting == "attention":
            from .rsq import attention_token_weights

            weights = attention_token_weights(config.r_min)
        run_sequential(model, batches, lambda name, _m: name in plan, solve, progress=progress, token_weights=weights)
    else:
        for name in tqdm(list(plan), desc="Quantizing modules", disable=not progress):
            module = model.get_submodule(name)
            set_submodule(model, name, solve(name, module, None))
    missing = [n for n in plan if not isinstance(model.get_submodule(n), PackedLinear)]
    if missing:
        raise ValueError(f"planned modules were never quantized (not reached by calibration?): {missing[:5]}")
    config.plan = {k: v.to_dict() for k, v in plan.items()}
    from .plan import overall_bits, plan_rows

    code_bits, bits = overall_bits(plan_rows(model))
    config.report = {"seconds": round(time.perf_counter() - start, 2), "code_bits": round(code_bits, 4),
                     "bits_per_weight": round(bits, 4), "skipped": skipped, "modules": report}
    attach_quantizer(model, config)
    return model


def attach_quantizer(model: nn.Module, config: HfcConfig) -> None:
    """Mark an in-memory quantized model the way ``from_pretrained`` would, so it saves natively."""
    from .quantizer import HfcQuantizer

    model.hf_quantizer = HfcQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.config.quantization_config = config
    from .integrations.hub import enable_hub_cards

    enable_hub_cards(model, tags=[config.quant_method.removeprefix("hfc_")])


def _tokenizer_for(model, config):
    from transformers import AutoTokenizer

    source = config.tokenizer or getattr(model, "name_or_path", None)
    if not source:
        raise ValueError("no tokenizer: pass `tokenizer=` or set the config's `tokenizer`")
    return AutoTokenizer.from_pretrained(source)
