"""Swap a model's norms for Fake norms and name them the way the schedule does.

Names: ``ln_2.{i}`` (MLP input), ``ln_1qk.{i}`` / ``ln_1v.{i}`` (attention input, QK and V paths) and ``ln_f``
(final norm) — GPT-2 names, also used for Llama (post_attention_layernorm, input_layernorm, model.norm).
GPT-2 fuses q, k, v into one ``c_attn``, so its columns [0:2C] are fed the QK-normed input and [2C:3C] the V-normed
input; Llama's q/k/v projections each normalise their own input. The class swap keeps every parameter name.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_compress.methods.ln_free.norms import FakeLayerNorm, FakeRMSNorm, _FakeNorm


class SplitQKVConv1D(Conv1D):
    """GPT-2 ``Conv1D`` whose Q/K columns read the QK-normed input and V columns the V-normed input."""

    def forward(self, x):
        norm = self._norm[0]
        width = x.shape[-1]
        qk = norm.qk(x) @ self.weight[:, : 2 * width] + self.bias[: 2 * width]
        v = norm.v(x) @ self.weight[:, 2 * width:] + self.bias[2 * width:]
        return torch.cat([qk, v], dim=-1)


class NormedLinear(nn.Linear):
    """A Llama q/k/v projection that normalises its own input on its path of the split input norm."""

    def forward(self, x):
        norm = self._norm[0]
        return super().forward(norm.v(x) if self._path == "v" else norm.qk(x))


def _swap_class(module: nn.Module, cls: type, norm: _FakeNorm, path: str | None = None) -> None:
    if isinstance(module, SplitQKVConv1D | NormedLinear):
        return
    # Conv1D / nn.Linear keep their parameters and names; the norm is held unregistered (it lives at ln_1)
    module.__class__ = cls
    module._norm = (norm,)
    module._path = path


def architecture(model) -> str:
    """'gpt2' or 'llama', or TypeError for anything else."""
    base = getattr(model, "transformer", None)
    if base is not None and hasattr(base, "h") and hasattr(base, "ln_f"):
        if getattr(model.config, "add_cross_attention", False):
            raise TypeError("LN removal does not support GPT-2 with cross-attention")
        return "gpt2"
    base = getattr(model, "model", None)
    if base is not None and hasattr(base, "layers") and hasattr(base, "norm"):
        layer = base.layers[0]
        if all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm")) and all(
            hasattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj")
        ):
            return "llama"
    raise TypeError(f"LN removal supports GPT-2 and Llama-family causal LMs, not {type(model).__name__}")


def make_removable(model, position0: bool = False):
    """Replace every norm of ``model`` (in place) by a Fake norm that is still real; returns the model.

    ``position0=True``: position 0 gets its own σ in every norm (tracked and frozen apart from the other positions;
    see norms.py), for models whose first token is an attention sink with a far larger residual stream.
    """
    if not isinstance(position0, bool):
        raise TypeError(f"position0 must be a bool, got {position0!r}")
    arch = architecture(model)
    if arch == "gpt2":
        base = model.transformer
        for block in base.h:
            if not isinstance(block.ln_1, _FakeNorm):
                block.ln_1 = FakeLayerNorm.from_norm(block.ln_1, split=True)
                block.ln_2 = FakeLayerNorm.from_norm(block.ln_2)
            _swap_class(block.attn.c_attn, SplitQKVConv1D, block.ln_1)
        if not isinstance(base.ln_f, _FakeNorm):
            base.ln_f = FakeLayerNorm.from_norm(base.ln_f)
    else:
        base = model.model
        for layer in base.layers:
            if not isinstance(layer.input_layernorm, _FakeNorm):
                layer.input_layernorm = FakeRMSNorm.from_norm(layer.input_layernorm, split=True)
                layer.post_attention_layernorm = FakeRMSNorm.from_norm(layer.post_attention_layernorm)
            for name, path in (("q_proj", "qk"), ("k_proj", "qk"), ("v_proj", "v")):
                _swap_class(getattr(layer.self_attn, name), NormedLinear, layer.input_layernorm, path)
        if not isinstance(base.norm, _FakeNorm):
            base.norm = FakeRMSNorm.from_norm(base.norm)
    install_position_hook(base)
    if position0:
        for norm, _ in removable_norms(model).values():
            norm.first_special.fill_(True)
    return model


def first_token_mask(args, kwargs) -> torch.Tensor | None:
    """``[B or 1, T, 1]`` bool, True at position 0, from a base model's forward arguments (position_ids, else the
    cache length); None if the sequence length is unknown."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    positions = kwargs.get("position_ids")
    if positions is None:
        if ref is None:
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        start = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        positions = torch.arange(start, start + ref.shape[1], device=ref.device)[None]
    return (positions == 0)[..., None]


def install_position_hook(base) -> None:
    """Tell every Fake norm (or position-0 AffineNorm) under ``base`` which rows are position 0, per forward."""
    if getattr(base, "_hfc_position_hook", None) is not None:
        return

    def before(module, args, kwargs):
        mask = first_token_mask(args, kwargs)
        for m in module.modules():
            if getattr(m, "uses_position0", False):
                m._first = mask

    def after(module, args, kwargs, output):
        for m in module.modules():
            if getattr(m, "uses_position0", False):
                m._first = None

    base._hfc_position_hook = (base.register_forward_pre_hook(before, with_kwargs=True),
                               base.register_forward_hook(after, with_kwargs=True))


def position0_active(model) -> bool:
    """Whether any norm still gives position 0 its own σ."""
    return any(bool(n.first_special) for n, _ in removable_norms(model).values())

def removable_norms(model) -> dict[str, tuple[_FakeNorm, str]]:
    """``{schedule name: (fake norm, path)}`` in removal order within each group."""
    arch = architecture(model)
    if arch == "gpt2":
        blocks, attn_in, mlp_in, final = model.transformer.h, "ln_1", "ln_2", model.transformer.ln_f
    else:
        blocks, final = model.model.layers, model.model.norm
        attn_in, mlp_in = "input_layernorm", "post_attention_layernorm"
    if not isinstance(final, _FakeNorm):
        raise ValueError("call make_removable(model) first: its norms are still the original modules")
    out = {}
    for i, b in enumerate(blocks):
        out[f"ln_2.{i}"] = (getattr(b, mlp_in), "qk")
    for i, b in enumerate(blocks):
        out[f"ln_1qk.{i}"] = (getattr(b, attn_in), "qk")
    for i, b in enumerate(blocks):
        out[f"ln_1v.{i}"] = (getattr(b, attn_in), "v")
    out["ln_f"] = (final, "qk")
    return out


def fake_status(model) -> dict[str, bool]:
    """Which norms (schedule names) are fake now (whether the position-0 σ is gone: ``not position0_active``)."""
    return {name: bool(norm.v_is_fake if path == "v" else norm.is_fake)
            for name, (norm, path) in removable_norms(model).items()}


def remove(model, name: str) -> None:
    """Freeze one norm (schedule name) at its tracked σ_avg; ``"pos0"`` collapses every position-0 σ."""
    norms = removable_norms(model)
    if name == "pos0":
        for norm, _ in norms.values():
            norm.collapse_first()
        return
    if name not in norms:
        raise ValueError(f"no norm named {name!r}; known: {', '.join(norms)}")
    norm, path = norms[name]
    norm.freeze(path)


@contextmanager
def _calibrating(norms):
    for n in norms:
        n._calibration = []
    try:
        yield
    finally:
        for n in norms:
            n._calibration = None


@torch.no_grad()
def estimate_std(model, batches) -> dict[str, float]:
    """Set every still-real norm's σ estimate to the mean per-token σ over ``batches`` (token-id tensors).

    Fake norms keep their frozen σ; the estimate is what the next :func:`remove` freezes (training then keeps
    refining it as an EMA). Returns ``{schedule name: σ}`` for the norms it set (with a position-0 σ, the σ of
    positions 1: ; the position-0 σ is set too).
    """
    norms = {id(n): n for n, _ in removable_norms(model).values()}
    was_training = model.training
    model.eval()
    try:
        with _calibrating(norms.values()):
            for ids in batches:
                model(input_ids=ids, use_cache=False)
            values = {k: [sum(v) / len(n._calibration) for v in zip(*n._calibration)]
                      for k, n in norms.items() if n._calibration}
    finally:
        model.train(was_training)
    if not values:
        raise ValueError("estimate_std needs at least one batch")
    out = {}
    for name, (norm, _) in removable_norms(model).items():
        if id(norm) in values and not norm.all_fake:
            rest, first = values[id(norm)]
            norm.std_ema.fill_(rest)
            norm.std_ema_first.fill_(first)
            norm.std_seen.fill_(True)
            out[name] = rest
    return out
