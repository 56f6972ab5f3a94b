"""Per-layer kept-token counts: validation, the fixed schedule a search ends with, and uniform baselines.

A schedule is two lists with one entry per encoder layer: ``prune_kept[i]`` tokens survive layer ``i``'s pruning
and ``merge_kept[i]`` its merging (the tokens the next layer sees). Counts include the prefix tokens (CLS, and
DeiT's distillation token), which are never removed, so every count lies in ``[num_prefix + 1, num_tokens]``.
Counts never grow: a token once removed cannot come back, so ``merge_kept[i] <= prune_kept[i] <= merge_kept[i-1]``.
"""

from __future__ import annotations

import numbers


def check_schedule(prune_kept, merge_kept, num_tokens: int, num_prefix: int, num_layers: int) -> tuple[list, list]:
    """Validate a schedule and return it as two lists of ``int``.

    Raises:
        TypeError: a list is missing or holds a non-integer (``2.5``, ``"3"``, ``True``).
        ValueError: wrong length, a count outside ``[num_prefix + 1, num_tokens]``, or a count that increases.
    """
    lists = []
    for name, counts in (("prune_kept", prune_kept), ("merge_kept", merge_kept)):
        if not isinstance(counts, (list, tuple)):
            raise TypeError(f"{name} must be a list of integers (one per layer), got {type(counts).__name__}")
        bad = [c for c in counts if isinstance(c, bool) or not isinstance(c, numbers.Integral)]
        if bad:
            raise TypeError(f"{name} must hold integer token counts, got {bad[0]!r} ({type(bad[0]).__name__})")
        if len(counts) != num_layers:
            raise ValueError(f"{name} has {len(counts)} entries but the model has {num_layers} encoder layers")
        out = [int(c) for c in counts]
        low = [c for c in out if not num_prefix + 1 <= c <= num_tokens]
        if low:
            raise ValueError(f"{name} count {low[0]} is outside [{num_prefix + 1}, {num_tokens}]: a layer sees "
                             f"{num_tokens} tokens and keeps its {num_prefix} prefix token(s) plus at least one more")
        lists.append(out)
    previous = num_tokens
    for i, (p, m) in enumerate(zip(*lists)):
        if p > previous or m > p:
            raise ValueError(f"kept-token counts must not increase (a removed token cannot come back): layer {i} "
                             f"gets {previous} tokens, prunes to {p}, merges to {m}")
        previous = m
    return lists[0], lists[1]


def monotone_schedule(prune_kept, merge_kept, num_tokens: int) -> tuple[list, list]:
    """The schedule a layer stack actually runs: each count capped by the one before (a search's learned counts
    need not decrease; a layer asked to keep more tokens than it gets keeps them all)."""
    prune, merge, n = [], [], num_tokens
    for p, m in zip(prune_kept, merge_kept):
        n = min(n, int(p))
        prune.append(n)
        n = min(n, int(m))
        merge.append(n)
    return prune, merge


def uniform_schedule(num_tokens: int, num_prefix: int, num_layers: int, removed: float, mode: str = "merge",
                     first: int = 1) -> tuple[list, list]:
    """A baseline: remove ``removed`` tokens in every layer from ``first`` on (by pruning or by merging).

    A fractional ``removed`` spreads its remainder over the earliest layers (e.g. 2.5 → 3, 2, 3, 2 …), so a
    baseline can be matched to a target FLOPs count closely.
    """
    if mode not in ("prune", "merge"):
        raise ValueError(f"mode must be 'prune' or 'merge', got {mode!r}")
    if removed < 0:
        raise ValueError(f"removed must be >= 0, got {removed}")
    prune, merge, n, done = [], [], num_tokens, 0.0
    for i in range(num_layers):
        step = 0
        if i >= first:
            step = int(round(removed * (i - first + 1) - done))
            done += step
        kept = max(num_prefix + 1, n - step)
        prune.append(kept if mode == "prune" else n)
        merge.append(kept)
        n = kept
    return prune, merge
