"""Uptraining with ``Trainer``: all parameters trainable, optional forward-KL distillation from the original.

The paper's best recipe distils the full-size model into the recursive one online (forward KL beat reverse KL,
TVD and JSD). ``Trainer`` has no teacher hook, so this subclass adds one term to ``compute_loss``; without a
teacher it is a plain ``Trainer``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
    """Mean over (non-ignored) tokens of KL(teacher ‖ student)."""
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float() / temperature, -1).reshape(-1, vocab)
    t = F.log_softmax(teacher_logits.float() / temperature, -1).reshape(-1, vocab)
    if labels is not None:
        keep = labels.reshape(-1) != -100
        s, t = s[keep], t[keep]
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


class RecursiveUptrainer(Trainer):
    """``Trainer`` whose loss adds ``distill_weight`` × forward KL from a frozen ``teacher``."""

    def __init__(self, *args, teacher=None, distill_weight: float = 1.0, temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if distill_weight < 0 or temperature <= 0:
            raise ValueError("distill_weight must be >= 0 and temperature > 0")
        self.teacher, self.distill_weight, self.temperature = teacher, distill_weight, temperature
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if self.teacher is not None and self.distill_weight > 0:
            teacher_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                teacher_logits = self.teacher(**teacher_inputs).logits
            labels = inputs.get("attention_mask")
            mask = None if labels is None else torch.where(labels.bool(), 0, -100)
            loss = loss + self.distill_weight * forward_kl(outputs.logits, teacher_logits, mask, self.temperature)
        return (loss, outputs) if return_outputs else loss
