"""Teacher Intervention QAT: fake-quant training on hf-compress grids, KD losses, the TI schedule as a Trainer
callback, and export to ``PackedLinear``."""

from hf_compress._imports import lazy_attributes
from hf_compress.registry import Method, register_method

register_method(Method(
    title="Teacher Intervention QAT", name="ti-qat", command="qat",
    paper="[Kim et al., EACL 2023](https://arxiv.org/abs/2302.11812)",
    summary="quantization-aware training (2/3/4-bit, ternary) with KD and Teacher Intervention; exports packed weights",
    config="hf_compress.methods.ti_qat.config:TIQATConfig",
    cli="hf_compress.methods.ti_qat.cli:add_command",
))

_LAZY = {"TIQATConfig": "config", "FakeQuantLinear": "fake_quant", "prepare_qat": "convert",
         "export_packed": "convert", "DistillationLoss": "losses", "TIConfig": "intervention",
         "TISchedule": "intervention", "TeacherIntervention": "intervention",
         "TeacherInterventionCallback": "callback"}
__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
