"""LinEAS: end-to-end learned activation steering (per-layer coordinate-wise affine maps trained with a summed
1-D Wasserstein loss between source and target prompts' activations) as a PEFT method
(``get_peft_model(model, LineasConfig())``), with a strength knob at inference and ``hf-compress steer``."""

from hf_compress._imports import lazy_attributes
from hf_compress.registry import Method, register_method

PAPER = "[Rodriguez et al., arXiv 2503.10679](https://arxiv.org/abs/2503.10679)"
register_method(Method(
    title="LinEAS", name="lineas", kind="peft", paper=PAPER,
    summary="LinEAS: end-to-end learned activation steering from unpaired source/target prompts (PEFT adapter, strength knob)",
    cli="hf_compress.methods.lineas.cli:add_command", command="steer",
    peft_types={"HFC_LINEAS": "lineas"}, register_peft="hf_compress.methods.lineas.model:register",
    card={"lineas": "hf_compress.methods.lineas.card:lineas_card"},
))

_LAZY = {"LineasConfig": "config", "LineasModel": "model", "LineasLayer": "layer", "LineasTraining": "train",
         "train_lineas": "train", "fit_mean_shift": "train", "read_prompts": "train", "lineas_loss": "loss",
         "sorted_w2": "loss", "steer": "layer", "lineas_layers": "model"}
__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
