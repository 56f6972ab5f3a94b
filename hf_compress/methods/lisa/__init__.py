"""LISA: layerwise importance-sampled fine-tuning as a PEFT method (``get_peft_model(model, LisaConfig(...))``),
and as a bare Trainer callback / schedule for custom loops."""

from hf_compress._imports import lazy_attributes
from hf_compress.registry import Method, register_method

register_method(Method(
    title="LISA", name="lisa", kind="training", paper="[Pan et al., arXiv 2403.17919](https://arxiv.org/abs/2403.17919)",
    summary="LISA: fine-tune embeddings, head and a few sampled decoder layers per interval (PEFT method + Trainer callback)",
    cli="hf_compress.methods.lisa.cli:add_command",
    peft_types={"HFC_LISA": "lisa"}, register_peft="hf_compress.methods.lisa.model:register",
    card={"lisa": "hf_compress.methods.lisa.card:lisa_card"},
))

_LAZY = {"LisaCallback": "callback", "LisaConfig": "config", "LisaSettings": "config", "LisaSchedule": "callback",
         "LisaModel": "model", "optimizer_state_numel": "callback"}
__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
