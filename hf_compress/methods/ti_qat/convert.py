"""Swap a model's planned linears for ``FakeQuantLinear`` (QAT) and back to ``PackedLinear`` (export)."""

from __future__ import annotations

from torch import nn

from hf_compress.calibration.discovery import set_submodule
from hf_compress.formats.linear import PackedLinear
from hf_compress.methods.ti_qat.config import TIQATConfig
from hf_compress.methods.ti_qat.fake_quant import FakeQuantLinear


def prepare_qat(model: nn.Module, config: TIQATConfig) -> nn.Module:
    """Make ``model`` trainable on ``config``'s grid, in place.

    Dense decoder/encoder linears (those ``config`` plans) start from their weights; ``PackedLinear`` modules of an
    already quantized model (a GPTQ/BAQ checkpoint loaded with ``from_pretrained``) start from their codes, so step 0
    reproduces that checkpoint. The model is then a plain trainable model (no quantizer attached) until
    :func:`export_packed`.
    """
    if not isinstance(config, TIQATConfig):
        raise TypeError(f"config must be a TIQATConfig, got {type(config).__name__}")
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    spec = config.default_spec()
    if packed:
        names = list(packed)
        config.init = "packed"
        other = sorted({str(m.spec.to_dict()) for m in packed.values() if m.spec != spec})
        if other:
            raise ValueError(f"the packed model stores {', '.join(other)}, the config asks for {spec.to_dict()}: "
                             "QAT keeps the checkpoint's grid, so pass the same bits/group_size/sym")
    else:
        config.check_model(model)
        names = config.planned_module_names(model)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, PackedLinear):
            new = FakeQuantLinear.from_packed(module, ternary=config.ternary, learn_scales=config.learn_scales)
        elif isinstance(module, nn.Linear):
            new = FakeQuantLinear.from_linear(module, spec, ternary=config.ternary, learn_scales=config.learn_scales,
                                              clip_grid=config.clip_grid)
        else:
            raise ValueError(f"{name} is a {type(module).__name__}; fake quantization wraps nn.Linear layers only")
        set_submodule(model, name, new.to(module.weight.device))
    if packed:  # a loaded quantized model: it is dense-trainable now, and no longer saves as the old method
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.hfc_qat_config = config
    return model


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def export_packed(model: nn.Module, config: TIQATConfig | None = None) -> nn.Module:
    """Turn every ``FakeQuantLinear`` into a ``PackedLinear`` holding its current codes, in place.

    The packed forward equals the fake-quant forward (same codes, fp16 scales and zero points; bias added after the
    matmul in both) bit for bit under the reference kernels (``HF_COMPRESS_KERNELS=reference``); the default CPU fast
    path multiplies in bf16, so its outputs differ by bf16 rounding (on the small Llama base: ~1e-4 nats of held-out
    CE, ``benchmarks/small_base_qat.py``). The model saves as an ordinary hf-compress checkpoint
    (``save_pretrained``) that ``from_pretrained`` loads with no import of hf-compress.
    """
    from hf_compress.pipeline.quantize import attach_quantizer
    from hf_compress.plan import overall_bits, plan_rows

    config = config or getattr(model, "hfc_qat_config", None)
    if not isinstance(config, TIQATConfig):
        raise ValueError("export_packed needs the TIQATConfig the model was prepared with (prepare_qat) or config=")
    modules = fake_quant_modules(model)
    if not modules:
        raise ValueError("the model has no FakeQuantLinear modules: call prepare_qat first")
    plan = {}
    for name, fq in modules.items():
        bias = None if fq.bias is None else fq.bias.detach()
        packed = PackedLinear.from_codes(fq.codes(), fq.stored_scale(), fq.zero, fq.spec, bias)
        set_submodule(model, name, packed.to(fq.weight.device))
        plan[name] = fq.spec.to_dict()
    config.plan = plan
    code_bits, bits = overall_bits(plan_rows(model))
    config.report = {"code_bits": round(code_bits, 4), "bits_per_weight": round(bits, 4)}
    attach_quantizer(model, config)
    return model
