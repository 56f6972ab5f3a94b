"""The config a QAT-trained checkpoint carries: the grid it was trained on and how it was trained.

Loading needs only the plan (as for every method); the rest is what the model card shows. Quantizing with it
directly (``hf_compress.quantize`` / ``hf-compress quantize --method ti-qat``) stores the QAT starting point after
zero steps: round-to-nearest, or TWN's ternary grid.
"""

from __future__ import annotations

from hf_compress.config import HfcConfig
from hf_compress.solvers.gptq import SolverResult

INITS = ("fp", "packed")


class TIQATConfig(HfcConfig):
    """Quantization-aware training on hf-compress grids (plain KD-QAT or Teacher Intervention).

    Args:
        bits, group_size, sym: the grid trained on and stored (2, 3 or 4 bits are the intended widths).
        ternary: train and store ternary weights ``{−α, 0, +α}`` (needs ``bits=2, sym=True``: the codes are
            2-bit symmetric codes restricted to ``{1, 2, 3}``).
        learn_scales: train the per-group scales too (LSQ); otherwise only the latent weights train.
        clip_grid: clipping candidates searched for the starting grid of a dense module (0: min-max).
        init: ``"fp"`` (start from dense weights) or ``"packed"`` (from a packed checkpoint, e.g. GPTQ's); recorded.
        training: what the training did (schedule, intervention points, losses, steps); filled in by the trainer
            and shown in the model card.
    """

    quant_method = "hfc_ti_qat"
    method_keys = ("ternary", "learn_scales", "clip_grid", "init", "training")

    def __init__(self, bits: int = 2, group_size: int = 64, sym: bool = False, ternary: bool = False,
                 learn_scales: bool = False, clip_grid: int = 0, init: str = "fp", training: dict | None = None, **kwargs):
        if ternary and (bits != 2 or not sym):
            raise ValueError(f"ternary weights are stored as 2-bit symmetric codes: pass bits=2, sym=True "
                             f"(got bits={bits}, sym={sym})")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not isinstance(clip_grid, int) or clip_grid < 0:
            raise ValueError(f"clip_grid must be a non-negative integer, got {clip_grid!r}")
        if training is not None and not isinstance(training, dict):
            raise TypeError(f"training must be a dict describing the run, got {type(training).__name__}")
        super().__init__(bits=bits, group_size=group_size, sym=sym, ternary=ternary, learn_scales=learn_scales,
                         clip_grid=clip_grid, init=init, training=training, **kwargs)

    def solve(self, weight, stats, spec, name=None):
        from torch import nn

        from hf_compress.methods.ti_qat.fake_quant import FakeQuantLinear

        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.weight.data = weight.float()
        fq = FakeQuantLinear.from_linear(layer, spec, ternary=self.ternary, clip_grid=self.clip_grid)
        return SolverResult(fq.codes(), fq.stored_scale(), fq.zero)
