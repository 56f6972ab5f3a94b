"""The token math of DiffRate, as plain tensor functions: importance order, pruning, bipartite merging.

DiffRate (Chen et al., ICCV 2023, §3) sorts a block's tokens by the attention the class token pays them (mean over
heads), then *prunes* the tail and *merges* the next-least-important tokens into the most important ones: each
merged token joins the kept token whose features it resembles most (cosine similarity), a bipartite matching from
the "unimportant" set into the "important" set. Prefix tokens (CLS, distillation) stay in front, are never
removed, and never absorb others (their features must stay the classifier's inputs).

Token *sizes* (how many original patches a token stands for) travel with the tokens: a merge is the size-weighted
mean, and attention adds ``log(size)`` to the logits (ToMe's proportional attention), so a merged token weighs in
attention as much as the patches it replaced.
"""

from __future__ import annotations

import torch


def importance_order(cls_attention: torch.Tensor, num_prefix: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Token order ``[B, N]``: the prefix tokens, then the rest by decreasing class attention; tokens marked not
    ``valid`` (already removed during a search) go last."""
    scores = cls_attention[:, num_prefix:].float()
    if valid is not None:
        scores = scores.masked_fill(~valid[:, num_prefix:], float("-inf"))
    rest = scores.argsort(dim=1, descending=True, stable=True) + num_prefix
    prefix = torch.arange(num_prefix, device=rest.device).expand(rest.shape[0], -1)
    return torch.cat([prefix, rest], dim=1)


def gather_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x [B, N, ...]`` reordered along the tokens by ``order [B, N]``."""
    index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand(*order.shape, *x.shape[2:])
    return x.gather(1, index)


def merge_tokens(x: torch.Tensor, size: torch.Tensor, keep: int, num_prefix: int, end: int | None = None,
                 keep_sources: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens ``[keep:end]`` of importance-sorted ``x [B, N, C]`` into tokens ``[num_prefix:keep]``.

    Each source token joins its most cosine-similar destination (matching on detached features: the choice is
    discrete); destinations become the size-weighted mean of themselves and their sources, and their ``size
    [B, N, 1]`` the sum. Returns ``(x[:, :keep], size[:, :keep])``, or with ``keep_sources`` the full-length
    tensors with the sources left in place (a search masks them instead of dropping them, so shapes stay fixed).
    """
    end = x.shape[1] if end is None else end
    if not num_prefix < keep < end:
        raise ValueError(f"merge needs num_prefix < keep < end, got {num_prefix}, {keep}, {end}")
    with torch.no_grad():
        metric = x[:, num_prefix:end].float()
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        similarity = metric[:, keep - num_prefix:] @ metric[:, :keep - num_prefix].transpose(1, 2)
        target = similarity.argmax(dim=-1) + num_prefix  # [B, end - keep], a destination per source
    weighted = x[:, :end] * size[:, :end]
    source_index = target.unsqueeze(-1)
    merged_size = size[:, :keep].scatter_add(1, source_index, size[:, keep:end])
    merged = weighted[:, :keep].scatter_add(1, source_index.expand(-1, -1, x.shape[-1]), weighted[:, keep:end])
    merged = merged / merged_size
    if not keep_sources:
        return merged, merged_size
    return torch.cat([merged, x[:, keep:]], dim=1), torch.cat([merged_size, size[:, keep:]], dim=1)
