"""Distillation losses of KD-QAT (TernaryBERT / Teacher Intervention, Kim et al. 2023 §3): the student matches the
full-precision teacher's logits (soft cross-entropy), hidden states, attention maps and attention-block outputs.
Every term averages over the real tokens only (``mask``), so padding never pulls the student.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


def soft_cross_entropy(student_logits, teacher_logits, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """``−Σ softmax(t/T) · log_softmax(s/T)`` per position, averaged over real positions (× T² keeps the gradient
    scale independent of T, Hinton et al.)."""
    t = F.softmax(teacher_logits.float() / temperature, dim=-1)
    ce = -(t * F.log_softmax(student_logits.float() / temperature, dim=-1)).sum(-1) * temperature**2
    return _masked_mean(ce, mask)


def hidden_mse(student_states, teacher_states, mask=None, relative: bool = True) -> torch.Tensor:
    """Σ over layers of the per-token MSE between hidden states ``[batch, seq, dim]``.

    ``relative`` divides each layer's MSE by the teacher's mean square there. BERT's hidden states are layer-normed,
    so the paper's plain MSE is well scaled; a pre-norm decoder's residual stream is not (SmolLM2's grows to
    hundreds with outlier channels, and plain MSE at 2 bits is ~1e5 against a logit term of ~5), so the deep layers
    would swamp every other term."""
    total = 0.0
    for s, t in zip(student_states, teacher_states):
        err = _masked_mean(((s.float() - t.float()) ** 2).mean(-1), mask)
        total = total + (err / _masked_mean((t.float() ** 2).mean(-1), mask).clamp(min=1e-12) if relative else err)
    return total


def attention_mse(student_maps, teacher_maps, mask=None) -> torch.Tensor:
    """Σ over layers of the MSE between attention probabilities ``[batch, heads, q, k]`` over real query tokens.
    (The paper compares pre-softmax scores clipped at −100; probabilities are what transformers' ``output_attentions``
    exposes for every architecture, and they need no clipping.)"""
    return sum(_masked_mean(((s.float() - t.float()) ** 2).sum(-1).mean(1), mask) for s, t in zip(student_maps, teacher_maps))


def _masked_mean(per_token: torch.Tensor, mask) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class DistillationLoss:
    """Weights of the KD-QAT loss terms (the paper: all 1, no ground-truth loss).

    Args:
        logits: soft cross-entropy against the teacher's logits.
        hidden: MSE of every hidden state (embeddings and each block's output).
        attention: MSE of every attention map.
        attention_output: MSE of every attention block's output (the output projection's output).
        relative: divide each hidden-state and attention-output MSE by the teacher's mean square there (see
            :func:`hidden_mse`; False is the paper's plain MSE).
        label: ordinary cross-entropy against the labels (0: off, as in the paper).
        temperature: softmax temperature of the logit term.
    """

    logits: float = 1.0
    hidden: float = 1.0
    attention: float = 1.0
    attention_output: float = 1.0
    label: float = 0.0
    temperature: float = 1.0
    relative: bool = True

    def __post_init__(self):
        for name, value in asdict(self).items():
            if name == "relative":
                if not isinstance(value, bool):
                    raise TypeError(f"relative must be a bool, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"distillation weight {name} must be a non-negative number, got {value!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not any(v for k, v in asdict(self).items() if k not in ("temperature", "relative")):
            raise ValueError("every distillation weight is 0: nothing to train on")
