"""Fixed per-layer token reduction in a ViT's encoder layers: what a compressed model runs at inference.

Each encoder layer keeps its own modules and weights (the state dict does not change); only its ``forward`` is
replaced, by swapping the instance's class for a subclass (the original class stays in the MRO, so ``isinstance``
checks and transformers' output capturing still see a ``ViTLayer``). A layer with nothing to remove and no merged
tokens before it runs the original forward unchanged, so a 100 % schedule gives the unmodified model's logits
bit for bit.

The reduced forward (DiffRate §3, between attention and MLP)::

    x = x + attention(norm1(x))            # + log(size) on the logits once tokens were merged
    sort tokens by class attention         # prefix tokens stay in front
    x = x[:, :prune_kept]                  # pruning
    merge x[:, merge_kept:] into x[:, :merge_kept]
    x = x + mlp(norm2(x))

Layer dropout is not applied on the reduced path (inference runs in eval mode, where it is the identity).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hf_compress.methods.diffrate.layout import BlockParts, attend, block_parts, encoder_layers, token_counts
from hf_compress.methods.diffrate.merging import gather_tokens, importance_order, merge_tokens
from hf_compress.methods.diffrate.rates import check_schedule


@dataclass
class ReductionState:
    """Token sizes carried from layer to layer within one forward pass (reset by the first layer)."""

    size: torch.Tensor | None = None  # [B, N, 1]; None while every token is one patch


@dataclass
class LayerReduction:
    index: int
    prune_kept: int
    merge_kept: int
    num_prefix: int
    parts: BlockParts
    state: ReductionState = field(repr=False, default_factory=ReductionState)


class TokenReducedLayer:
    """Mixin put in front of an encoder layer's class; its forward applies the layer's fixed schedule."""

    _hfc_diffrate: LayerReduction

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, *args, **kwargs):
        spec = self._hfc_diffrate
        if spec.index == 0:
            spec.state.size = None
        n, size = hidden_states.shape[1], spec.state.size
        reduce = spec.prune_kept < n or spec.merge_kept < n
        if not reduce and size is None:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise ValueError("token reduction does not support an attention_mask (tokens are reordered and removed)")
        if size is not None and size.shape[:2] != hidden_states.shape[:2]:
            raise RuntimeError(f"layer {spec.index} got {tuple(hidden_states.shape[:2])} tokens but the token sizes "
                               f"are {tuple(size.shape[:2])}: the encoder layers must run in order, starting at layer 0")
        parts = spec.parts
        attn_out, cls_attention = attend(parts, parts.norm_attention(hidden_states),
                                         None if size is None else size[..., 0].log())
        x = hidden_states + attn_out
        if reduce:
            x, size = reduce_tokens(x, size, cls_attention, spec.prune_kept, spec.merge_kept, spec.num_prefix)
            spec.state.size = size
        return x + parts.mlp(parts.norm_mlp(x))


def reduce_tokens(x, size, cls_attention, prune_kept: int, merge_kept: int, num_prefix: int):
    """Sort by class attention, prune to ``prune_kept``, merge to ``merge_kept``; returns ``(x, size)``.

    ``size`` stays None while no token was merged (pruning alone leaves every token one patch), so the layers
    after a pure pruning step that remove nothing themselves run the original forward."""
    order = importance_order(cls_attention, num_prefix)
    keep = min(prune_kept, x.shape[1])
    x = gather_tokens(x, order)[:, :keep]
    if size is not None:
        size = gather_tokens(size, order)[:, :keep]
    if merge_kept < keep:
        x, size = merge_tokens(x, x.new_ones(*x.shape[:2], 1) if size is None else size, merge_kept, num_prefix)
    return x, size


_REDUCED_CLASSES: dict[type, type] = {}


def _reduced_class(cls: type) -> type:
    if issubclass(cls, TokenReducedLayer):
        return cls
    if cls not in _REDUCED_CLASSES:
        _REDUCED_CLASSES[cls] = type(f"TokenReduced{cls.__name__}", (TokenReducedLayer, cls), {})
    return _REDUCED_CLASSES[cls]


def apply_token_reduction(model: nn.Module, prune_kept=None, merge_kept=None, num_prefix: int | None = None) -> nn.Module:
    """Make ``model``'s encoder layers run a fixed kept-token schedule (in place; returns ``model``).

    Args:
        model: a transformers ViT/DeiT-style model (any pre-norm layout :func:`~.layout.block_parts` accepts).
        prune_kept: tokens kept after each layer's pruning (``None``: all).
        merge_kept: tokens kept after each layer's merging (``None``: as ``prune_kept``).
        num_prefix: prefix tokens never removed (default: found from the position embedding).

    Raises TypeError/ValueError for a model of another layout or a bad schedule (see ``check_schedule``).
    """
    layers = encoder_layers(model)
    num_tokens, found_prefix = token_counts(model)
    num_prefix = found_prefix if num_prefix is None else num_prefix
    if prune_kept is None:
        prune_kept = list(merge_kept) if merge_kept is not None else [num_tokens] * len(layers)
    merge_kept = list(prune_kept) if merge_kept is None else merge_kept
    prune_kept, merge_kept = check_schedule(prune_kept, merge_kept, num_tokens, num_prefix, len(layers))
    state = ReductionState()
    for i, layer in enumerate(layers):
        layer.__class__ = _reduced_class(type(layer))
        layer._hfc_diffrate = LayerReduction(i, prune_kept[i], merge_kept[i], num_prefix, block_parts(layer), state)
    return model


def remove_token_reduction(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_token_reduction` (in place)."""
    for layer in model.modules():
        if isinstance(layer, TokenReducedLayer):
            layer.__class__ = next(c for c in type(layer).__mro__[1:] if c is not TokenReducedLayer
                                   and not issubclass(c, TokenReducedLayer))
            del layer._hfc_diffrate
    return model


def kept_schedule(model: nn.Module) -> tuple[list[int], list[int]] | None:
    """The ``(prune_kept, merge_kept)`` schedule ``model`` runs, or None when it has no token reduction."""
    specs = [m._hfc_diffrate for m in model.modules() if isinstance(m, TokenReducedLayer)]
    if not specs:
        return None
    return [s.prune_kept for s in specs], [s.merge_kept for s in specs]
