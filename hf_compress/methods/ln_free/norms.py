"""FakeLayerNorm / FakeRMSNorm: a norm whose per-token 1/σ can be replaced by a frozen average 1/σ_avg.

``FakeLN(x) = (x - μ(x)) / σ_avg ⊙ γ + β`` (FakeRMSNorm: ``x / σ_avg ⊙ γ``). While a norm is still real it keeps
an EMA (momentum 0.9, as the 2025 code) of the batch-mean per-token σ of its input; flipping ``is_fake`` freezes that
value, so σ_avg is the average σ just before removal (the paper's choice). The input norm of attention (GPT-2
``ln_1``, Llama ``input_layernorm``) has two switches, QK path and V path (the paper removes them separately): its
``forward`` is the identity and the q/k and v projections call :meth:`qk` and :meth:`v` themselves (see swap.py).

Position 0 (the papers' BOS special case): its residual stream can be far larger than every other token's (an
attention sink; SmolLM2's is up to 164× the others', benchmarks/ln_free_probe.py), so one σ_avg for all positions
scales it up by two orders of magnitude and the model diverges. With ``first_special`` set (``make_removable(model, position0=True)``) the norm tracks two EMAs,
position 0 and positions 1:, and a removed norm divides position 0 by its own frozen σ. Which rows are position 0
comes from the model's ``position_ids`` (a hook set by swap.py; sequence index 0 when called on its own).
``remove(model, "pos0")`` (the schedule's optional last event) collapses it to the shared σ_avg, as the papers do.
The V path's position-0 σ is frozen at the QK path's position-0 σ times the V/QK drift of the shared σ, so the
export can fold one σ_qk/σ_v ratio into the V projection for every position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MOMENTUM = 0.9


def first_rows(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``[B or 1, T, 1]`` bool, True where the token of ``x [..., T, C]`` is at position 0: ``mask`` (set from the
    model's position_ids for the current forward) when it fits ``x``, else sequence index 0."""
    if mask is not None and mask.dim() == x.dim() and mask.shape[-2] == x.shape[-2]:
        return mask.to(x.device)
    m = torch.zeros(x.shape[-2], 1, dtype=torch.bool, device=x.device)
    m[0] = True
    return m


class _FakeNorm(nn.Module):
    centre = True
    uses_position0 = True  # swap.py's model hook sets ``_first`` on such modules

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, eps: float, split: bool = False):
        super().__init__()
        self.weight, self.bias, self.eps, self.split = weight, bias, eps, split
        self.register_buffer("std_ema", torch.tensor(1.0))
        self.register_buffer("std_seen", torch.tensor(False))
        self.register_buffer("avg_std", torch.tensor(1.0))  # frozen σ_avg of the QK path (or the only path)
        self.register_buffer("is_fake", torch.tensor(False))
        if split:
            self.register_buffer("avg_std_v", torch.tensor(1.0))
            self.register_buffer("v_is_fake", torch.tensor(False))
        self.register_buffer("first_special", torch.tensor(False))  # position 0 has its own σ
        self.register_buffer("std_ema_first", torch.tensor(1.0))
        self.register_buffer("avg_std_first", torch.tensor(1.0))
        if split:
            self.register_buffer("avg_std_v_first", torch.tensor(1.0))
        self._calibration: list[tuple[float, float]] | None = None
        self._first: torch.Tensor | None = None  # [B or 1, T, 1] bool: rows at position 0 (set by a model hook)

    def first_mask(self, x: torch.Tensor) -> torch.Tensor:
        """``[B or 1, T, 1]`` bool, True where the token is at position 0."""
        return first_rows(self._first, x)

    def _split_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean σ over positions ≠ 0, mean σ over position 0) when ``first_special``, else (mean σ, same)."""
        std = self.token_std(x.detach())
        if not bool(self.first_special):
            v = std.mean()
            return v, v
        first = self.first_mask(x).expand_as(std)
        rest = std[~first].mean() if bool((~first).any()) else std.mean()
        pos0 = std[first].mean() if bool(first.any()) else self.std_ema_first.clone()
        return rest, pos0

    def token_std(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token σ the real norm divides by, ``[..., 1]`` in fp32."""
        x = x.float()
        if self.centre:
            return (x.var(-1, unbiased=False, keepdim=True) + self.eps).sqrt()
        return (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def _track(self, x: torch.Tensor) -> None:
        if self._calibration is not None:
            rest, pos0 = self._split_stats(x)
            self._calibration.append((float(rest), float(pos0)))
            return
        if not self.training or self.all_fake:
            return
        value, first = self._split_stats(x)
        if bool(self.std_seen):
            self.std_ema.mul_(MOMENTUM).add_((1 - MOMENTUM) * value)
            self.std_ema_first.mul_(MOMENTUM).add_((1 - MOMENTUM) * first)
        else:
            self.std_ema.copy_(value)
            self.std_ema_first.copy_(first)
            self.std_seen.fill_(True)

    @property
    def all_fake(self) -> bool:
        return bool(self.is_fake) and (not self.split or bool(self.v_is_fake))

    def _apply_norm(self, x: torch.Tensor, fake: bool, avg_std: torch.Tensor,
                    avg_first: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        if self.centre:
            h = h - h.mean(-1, keepdim=True)
        if not fake:
            std = self.token_std(x)
        elif bool(self.first_special):
            std = torch.where(self.first_mask(x), avg_first, avg_std)
        else:
            std = avg_std
        h = h / std
        h = h.to(dtype) * self.weight
        return h + self.bias if self.bias is not None else h

    def freeze(self, path: str = "qk") -> None:
        """Replace the real σ by the tracked average on ``path`` ('qk' or 'v'; unsplit norms have only 'qk')."""
        if not bool(self.std_seen):
            raise ValueError("this norm has seen no data yet: train a step or call estimate_std() before removing it")
        if path == "v":
            self.avg_std_v.copy_(self.std_ema)
            # keep σ_qk/σ_v equal at position 0 and elsewhere, so that the export folds one ratio into W_v
            first = self.avg_std_first if bool(self.is_fake) else self.std_ema_first
            self.avg_std_v_first.copy_(first * self.avg_std_v / (self.avg_std if bool(self.is_fake) else self.std_ema))
            self.v_is_fake.fill_(True)
        else:
            self.avg_std.copy_(self.std_ema)
            self.avg_std_first.copy_(self.std_ema_first)
            self.is_fake.fill_(True)

    def collapse_first(self) -> None:
        """Drop the position-0 σ: position 0 uses the shared σ_avg from now on (the papers' disable_bos_std)."""
        self.first_special.fill_(False)

    def qk(self, x: torch.Tensor) -> torch.Tensor:
        self._track(x)
        return self._apply_norm(x, bool(self.is_fake), self.avg_std, self.avg_std_first)

    def v(self, x: torch.Tensor) -> torch.Tensor:
        # tracked once per forward, in qk(); v() sees the same input
        return self._apply_norm(x, bool(self.v_is_fake), self.avg_std_v, getattr(self, "avg_std_v_first", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split:  # the projections normalise their own inputs
            return x
        return self.qk(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, split={self.split}"


class FakeLayerNorm(_FakeNorm):
    """LayerNorm with a switchable frozen σ (mean-centring kept: it is linear)."""

    centre = True

    @classmethod
    def from_norm(cls, norm: nn.LayerNorm, split: bool = False) -> "FakeLayerNorm":
        return cls(norm.weight, norm.bias, norm.eps, split)


class FakeRMSNorm(_FakeNorm):
    """RMSNorm (Llama family) with a switchable frozen RMS: ``x / σ_avg ⊙ γ``."""

    centre = False

    @classmethod
    def from_norm(cls, norm: nn.Module, split: bool = False) -> "FakeRMSNorm":
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        return cls(norm.weight, None, eps, split)


def real_reference(norm: _FakeNorm, x: torch.Tensor) -> torch.Tensor:
    """What the original norm computes (for tests): torch's layer_norm / an fp32 RMSNorm."""
    if norm.centre:
        return F.layer_norm(x, norm.weight.shape, norm.weight, norm.bias, norm.eps)
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype) * norm.weight
