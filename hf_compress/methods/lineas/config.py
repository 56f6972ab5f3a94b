"""LinEAS's PEFT config (:class:`LineasConfig`, ``peft_type="HFC_LINEAS"``).

PEFT only accepts its own closed enum in ``register_peft_method``, so the type is written into PEFT's mappings by
:func:`hf_compress.methods.lineas.model.register`, as LISA and relaxed recursive LoRA do; ``import hf_compress`` (or
the installed autoload hook, at the first ``import peft``) registers it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from peft import PeftConfig

__all__ = ["LineasConfig", "LineasPeftType", "check_strength"]


class LineasPeftType(str, enum.Enum):
    """A str-Enum (not a bare str): transformers' ``load_adapter`` reads ``peft_type.value``."""

    LINEAS = "HFC_LINEAS"


def check_strength(strength) -> float:
    """``strength`` as a float, or a TypeError/ValueError naming what is wrong (NaN and inf are refused)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise TypeError(f"LinEAS strength must be a real number, got {type(strength).__name__}")
    if not math.isfinite(strength):
        raise ValueError(f"LinEAS strength must be finite, got {strength}")
    return float(strength)


@dataclass
class LineasConfig(PeftConfig):
    """LinEAS (Rodriguez et al., arXiv 2503.10679) as a PEFT method: ``get_peft_model(model, LineasConfig())``.

    Every targeted module's output ``z`` (the last dimension, one coordinate per hidden unit) goes through a
    coordinate-wise affine map ``T(z) = ω ⊙ z + b``, initialised to the identity (ω = 1, b = 0). At inference the
    map is interpolated towards the identity by ``strength`` λ: ``T^λ(z) = (1 + λ(ω − 1)) ⊙ z + λ b``; λ = 0 is the
    base model exactly, λ = 1 the trained map, λ > 1 extrapolates and λ < 0 pushes the other way.

    Args:
        target_modules: module names (suffixes) or a regex of the modules whose *outputs* are steered; ``None`` takes
            the model type's default (Llama family: every ``post_attention_layernorm``, i.e. the normalised input of
            each MLP — see :mod:`hf_compress.methods.lineas.model` for why).
        strength: λ applied at inference (saved with the adapter; change it with ``model.set_strength``).
        l1_penalty: λ1 of the sparse-group-lasso ``λ1 Σ_ℓ (‖ω_ℓ − 1‖₁ + ‖b_ℓ‖₁)`` (proximal step; 0 = off).
        group_penalty: λG of ``λG Σ_ℓ √d_ℓ (‖ω_ℓ − 1‖₂ + ‖b_ℓ‖₂)``, which switches whole layers off (0 = off).
    """

    target_modules: list[str] | str | None = field(default=None, metadata={"help": "modules whose outputs are steered"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "modules never steered"})
    strength: float = field(default=1.0, metadata={"help": "λ: 0 = identity, 1 = the trained map"})
    l1_penalty: float = field(default=0.0, metadata={"help": "λ1 of the sparse-group-lasso (per coordinate)"})
    group_penalty: float = field(default=0.0, metadata={"help": "λG of the sparse-group-lasso (per layer)"})
    task_type: str | None = field(default="CAUSAL_LM", metadata={"help": "PEFT task type"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = LineasPeftType.LINEAS
        self.strength = check_strength(self.strength)
        for name in ("l1_penalty", "group_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"LinEAS {name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.target_modules, (list, tuple, set)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"LinEAS target_modules must be non-empty module names, got {self.target_modules!r}")
            self.target_modules = sorted(set(self.target_modules))
        elif self.target_modules is not None and not (isinstance(self.target_modules, str) and self.target_modules):
            raise TypeError(f"LinEAS target_modules must be a list of names or a regex, got {self.target_modules!r}")
