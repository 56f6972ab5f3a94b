"""FLOPs of a ViT under a kept-token schedule, counted as multiply-accumulates (the paper's and fvcore's convention).

One function serves both the report (integer counts) and the search (tensor counts with a straight-through
``min``), so the FLOPs the search constrains are exactly the FLOPs the benchmark reports.

Per layer with ``N`` tokens in, width ``C``, MLP width ``I``, after pruning ``N_p = min(N, prune)``, after merging
``N_m = min(N_p, merge)``::

    attention   4·N·C² + 2·N²·C          (q, k, v, output projections; scores and weighted sum)
    importance  N·C                      (the class token's attention row, recomputed because fused attention
                                          returns no weights; only in layers that reduce or follow a merge)
    matching    (N_p − N_m)·(N_m − P)·C  (cosine similarity of each merged token with each kept non-prefix token)
    MLP         2·N_m·C·I

plus the patch embedding (``num_patches · C · channels · patch²``) and the classifier (``C · num_labels``).
Norms, softmax, GELU and the importance sort are not counted (as in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FlopsSpec:
    """The shape numbers the count needs (``num_tokens`` includes the ``num_prefix`` prefix tokens)."""

    num_tokens: int
    num_prefix: int
    hidden: int
    intermediate: int
    num_layers: int
    patch_dim: int
    num_labels: int

    @classmethod
    def from_config(cls, config, num_prefix: int) -> "FlopsSpec":
        """From a ViT/DeiT-style config (``image_size``, ``patch_size``, ``num_channels``, ``hidden_size`` …)."""
        image, patch = _pair(config.image_size), _pair(config.patch_size)
        patches = (image[0] // patch[0]) * (image[1] // patch[1])
        return cls(num_tokens=patches + num_prefix, num_prefix=num_prefix, hidden=config.hidden_size,
                   intermediate=config.intermediate_size, num_layers=config.num_hidden_layers,
                   patch_dim=config.num_channels * patch[0] * patch[1], num_labels=max(int(config.num_labels), 0))


def _pair(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def count_flops(spec: FlopsSpec, prune_kept=None, merge_kept=None, minimum=min, cut=None):
    """Multiply-accumulates of one image's forward pass; ``None`` schedules mean no reduction.

    ``minimum(n, k)`` caps a count by the tokens a layer gets: the builtin ``min`` for integer schedules, a
    straight-through min when the counts are the search's differentiable tensors. ``cut(n)``, applied to a
    layer's incoming count after its attention term, lets the search stop the gradient there (the paper's
    choice: a layer's rates feel its own MLP and the next layer's attention, not every later layer).
    """
    C, I, P = spec.hidden, spec.intermediate, spec.num_prefix
    full = [spec.num_tokens] * spec.num_layers
    prune_kept, merge_kept = prune_kept or full, merge_kept or full
    n = spec.num_tokens
    total = (spec.num_tokens - P) * C * spec.patch_dim + C * spec.num_labels
    merged = False
    for prune, merge in zip(prune_kept, merge_kept):
        total = total + 4 * n * C * C + 2 * n * n * C
        n = n if cut is None else cut(n)
        n_pruned = minimum(n, prune)
        n_merged = minimum(n_pruned, merge)
        if merged or bool(n_merged < n):  # the layers that take the reduced path (see ``reduction``)
            total = total + n * C
        total = total + (n_pruned - n_merged) * (n_merged - P) * C + 2 * n_merged * C * I
        merged = merged or bool(n_merged < n_pruned)
        n = n_merged
    return total
