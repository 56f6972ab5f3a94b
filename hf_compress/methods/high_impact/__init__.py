"""Layer-wise high-impact parameter ratios."""

from hf_compress.registry import Method, register_method

register_method(Method(
    title="high-impact parameter ratios", name="high-impact", summary="high-impact ratios: per module, a Fisher-chosen share of channels at the high width",
    paper="Pham et al., layer-wise high-impact parameter ratio optimization",
    config="hf_compress.methods.high_impact.config:HighImpactConfig",
))
