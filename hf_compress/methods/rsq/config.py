"""RSQConfig: GPTQ on a rotated model with attention-concentration token weighting (the paper's recipe)."""

from __future__ import annotations

from hf_compress.methods.gptq.config import GPTQConfig


class RSQConfig(GPTQConfig):
    """GPTQ on a rotated model with attention-concentration token weighting.

    Args:
        bits, group_size, sym: the grid (RSQ's paper default: 3-bit; ours: asymmetric, groups as the protocol).
        r_min: smallest token weight after min-max scaling (the paper: 0.01 with rotation).
        rotate: fold norms and rotate the residual stream first (``False``: token weighting only).
        rotation_seed: seed of the orthogonal matrix.
        token_weighting: ``"attention"`` (RSQ) or None.
        Other options: as :class:`GPTQConfig`. Rotation and token weighting are also options of every other
        config (``BAQConfig(..., rotate=True, token_weighting="attention")`` is rotation + BAQ).
    """

    quant_method = "hfc_rsq"

    def __init__(self, bits: int = 3, group_size: int = 128, r_min: float = 0.01, rotate: bool = True,
                 rotation_seed: int = 0, token_weighting: str | None = "attention", **kwargs):
        super().__init__(bits=bits, group_size=group_size, r_min=r_min, rotate=rotate, rotation_seed=rotation_seed,
                         token_weighting=token_weighting, **kwargs)
