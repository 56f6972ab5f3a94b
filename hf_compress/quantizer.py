"""One generic ``HfQuantizer`` for every hf-compress method, and its registration with transformers.

Pre-quantized load: on the meta device, each module the plan names becomes a ``PackedLinear`` whose buffers
have exactly the checkpoint's shapes and dtypes, then transformers fills them. Quantize-on-load: the dense
weights load as usual, then ``quantize`` runs (with calibration when the method needs it).
"""

from __future__ import annotations

from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .config import CONFIG_CLASSES


class HfcQuantizer(HfQuantizer):
    """Builds packed modules from a config's plan, or runs the config's method after a dense load."""

    requires_calibration = False
    serialized_names = {"weight": ["weight", "scales", "qzeros"]}

    def validate_environment(self, *args, **kwargs):
        if self.pre_quantized:
            self.quantization_config.plan_specs()  # raises if the checkpoint's config holds no plan

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            return model
        from .checkpoint import verify_checkpoint_files

        verify_checkpoint_files(checkpoint_files)
        build_packed_modules(model, self.quantization_config.plan_specs(), dtype=model.dtype)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            from .formats.linear import PackedLinear

            for mod in model.modules():  # per-column widths must agree with the plan (corrupt checkpoint?)
                if isinstance(mod, PackedLinear) and mod.spec.is_mixed:
                    mod.segments()
            from .integrations.hub import enable_hub_cards

            enable_hub_cards(model, tags=[self.quantization_config.quant_method.removeprefix("hfc_")])
            return model
        from .pipeline import quantize

        config = self.quantization_config
        model.hf_quantizer = None  # `quantize` refuses models that look quantized already
        model.is_quantized = False
        quantize(model, config)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def build_packed_modules(model, plan, dtype=None) -> None:
    """Swap every planned module of a (meta) model for an empty ``PackedLinear`` with matching shapes."""
    from .calibration.discovery import is_linear_like, set_submodule, weight_matrix
    from .formats.linear import PackedLinear

    for name, spec in plan.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the checkpoint's plan names module {name!r}, which this model does not have") from None
        if not is_linear_like(module):
            raise ValueError(f"the checkpoint's plan names {name!r}, a {type(module).__name__}, not a linear layer")
        out_f, in_f = weight_matrix(module).shape
        has_bias = getattr(module, "bias", None) is not None
        set_submodule(model, name, PackedLinear(in_f, out_f, spec, bias=has_bias, dtype=dtype, device="meta"))


def all_config_classes() -> tuple:
    from .baq import BAQConfig
    from .high_impact import HighImpactConfig
    from .layerwise import LayerwiseQuantConfig
    from .rsq import RSQConfig

    return (*CONFIG_CLASSES, LayerwiseQuantConfig, BAQConfig, HighImpactConfig, RSQConfig)


def register() -> None:
    """Register every hf-compress config and the quantizer with transformers (idempotent)."""
    for cls in all_config_classes():
        AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(cls.quant_method, cls)
        AUTO_QUANTIZER_MAPPING.setdefault(cls.quant_method, HfcQuantizer)
