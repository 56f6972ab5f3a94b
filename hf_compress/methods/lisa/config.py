"""LISA's settings (:class:`LisaSettings`) and its PEFT config (:class:`LisaConfig`, ``peft_type="HFC_LISA"``).

``LisaConfig`` is a ``PeftConfig`` that carries the same settings, so one object serves ``get_peft_model``,
:meth:`LisaCallback.from_config <hf_compress.methods.lisa.callback.LisaCallback.from_config>` and
:class:`~hf_compress.methods.lisa.callback.LisaSchedule`. PEFT only accepts its own closed enum in
``register_peft_method``, so the type is written into PEFT's mappings (``model.register``), as relaxed recursive
LoRA does; ``import hf_compress`` (which importing this module implies) registers it as soon as ``peft`` is
imported (``integrations.autoload``).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields

from peft import PeftConfig

__all__ = ["LisaConfig", "LisaPeftType", "LisaSettings", "lisa_settings"]


class LisaPeftType(str, enum.Enum):
    """A str-Enum (not a bare str): transformers' ``load_adapter`` reads ``peft_type.value``."""

    LISA = "HFC_LISA"


@dataclass
class LisaSettings:
    """LISA settings, validated on creation (the CLI's ``--num-active-layers`` … flags are these fields).

    Args:
        num_active_layers: γ, decoder layers trained per interval (paper: 2 for 7B-class models).
        interval_steps: K, optimizer steps between two samplings (paper/LMFlow default 20).
        seed: seeds the layer sampling together with the interval index; ``None`` uses ``TrainingArguments.seed``
            under the Trainer (0 in a custom loop).
        train_embeddings: keep the input embeddings (and position embeddings) trainable.
        train_head: keep the output head trainable (a head tied to the embeddings is one parameter: it trains if
            either switch is on).
        train_final_norm: keep every other parameter outside the decoder layers (the final norm) trainable.
        release_state: drop the optimizer state of the sampled layers at every interval boundary (fresh AdamW state
            per interval, as in the paper; bounded memory). ``False`` keeps stale moments, as LMFlow's callback does.
        layers: dotted path of the decoder ``nn.ModuleList`` (e.g. ``"model.layers"``); ``None`` finds the
            ``ModuleList`` of repeated blocks that holds the most parameters.
    """

    num_active_layers: int = 2
    interval_steps: int = 20
    seed: int | None = None
    train_embeddings: bool = True
    train_head: bool = True
    train_final_norm: bool = True
    release_state: bool = True
    layers: str | None = None

    def __post_init__(self):
        self._validate_settings()

    def _validate_settings(self) -> None:
        for name in ("num_active_layers", "interval_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"LISA {name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"LISA {name} must be >= 1, got {value}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"LISA seed must be a non-negative int or None, got {self.seed!r}")
        if self.seed is not None and self.seed >= 2**63:  # DDP ranks exchange it as an int64
            raise ValueError(f"LISA seed must be below 2**63, got {self.seed}")
        if self.layers is not None and not isinstance(self.layers, str):
            raise TypeError(f"LISA layers must be a dotted attribute path such as 'model.layers', got {type(self.layers).__name__}")

    def to_dict(self) -> dict:
        return asdict(self)


SETTINGS = tuple(f.name for f in fields(LisaSettings))


def lisa_settings(config) -> LisaSettings:
    """The plain settings of ``config`` (a :class:`LisaSettings` or a :class:`LisaConfig`)."""
    return LisaSettings(**{name: getattr(config, name) for name in SETTINGS})


@dataclass
class LisaConfig(PeftConfig, LisaSettings):
    """LISA as a PEFT method: ``get_peft_model(model, LisaConfig(num_active_layers=2, interval_steps=20))``.

    The PEFT model trains the embeddings, the head and the sampled decoder layers of the base model in place (no
    added modules); its saved adapter holds, as full tensors, only the parameters that training changed (see
    :mod:`hf_compress.methods.lisa.model`). Every :class:`LisaSettings` field is accepted, plus PEFT's own
    (``task_type`` defaults to ``"CAUSAL_LM"``).

    Args:
        base_fingerprint: the base model's fingerprint, recorded by ``get_peft_model`` and checked when the adapter
            is loaded (a different base is a ValueError); leave it ``None``.
        stored_layers: the decoder layers whose tensors the saved adapter holds (written on save).
    """

    task_type: str | None = field(default="CAUSAL_LM", metadata={"help": "PEFT task type"})
    base_fingerprint: str | None = field(default=None, metadata={"help": "fingerprint of the base model (set by PEFT)"})
    stored_layers: list[int] | None = field(default=None, metadata={"help": "decoder layers stored in the adapter"})

    def __post_init__(self):
        super().__post_init__()
        self._validate_settings()
        self.peft_type = LisaPeftType.LISA
