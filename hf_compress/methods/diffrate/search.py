"""The differentiable compression-rate search (DiffRate §3.2–3.3): learn each layer's pruning and merging counts
under a FLOPs constraint, with the model's weights frozen.

Every layer after the first has two :class:`RateProxy` modules (prune, merge), each a softmax over candidate kept
counts (every ``granularity``-th count). The *differentiable discrete proxy*:

* forward, the count is ``ceil(Σ p_c · c)`` and tokens past it are masked out of attention (hard 0/1 mask);
* backward, the mask is replaced by each token's keep probability ``Σ_{c > j} p_c`` (a straight-through
  estimator), and the ceil by the identity, so the task loss and the FLOPs both reach the probabilities.

Masked tokens stay in the tensors (shapes are fixed during the search) and merged tokens are kept as masked
sources. Loss: ``CE + λ·(FLOPs/FLOPs₀ − target)²``, FLOPs from :func:`~.flops.count_flops` with a straight-through
``min``. The search ends with integer counts (made non-increasing) for :func:`~.modeling.compress`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hf_compress.methods.diffrate.flops import FlopsSpec, count_flops
from hf_compress.methods.diffrate.layout import attend, block_parts, encoder_layers, token_counts
from hf_compress.methods.diffrate.merging import gather_tokens, importance_order, merge_tokens
from hf_compress.methods.diffrate.rates import monotone_schedule


class _StraightCeil(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.ceil(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _StraightMin(torch.autograd.Function):
    """``min(n, k)`` whose gradient goes to both arguments, whichever is smaller (the paper's straight-through min:
    the tokens after merging answer to the layer's pruning and merging rates alike)."""

    @staticmethod
    def forward(ctx, n, k):
        return torch.minimum(n, k)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


def _detach(n):
    return n.detach() if isinstance(n, torch.Tensor) else n


def straight_min(n, k):
    k = torch.as_tensor(k, dtype=torch.float32)
    return _StraightMin.apply(torch.as_tensor(n, dtype=k.dtype, device=k.device), k)


class RateProxy(nn.Module):
    """A learned distribution over one layer's kept-token count (prefix tokens included).

    Args:
        num_tokens: tokens the model's layers see (prefix included).
        num_prefix: tokens never removed.
        granularity: gap between candidate counts (the paper uses 4 on 196 patches).
        init: ``"uniform"`` (the paper: every candidate equally likely, so the search starts near half the tokens)
            or ``"full"`` (the full count is ``e`` times likelier than each other, ~73 % of the mass: the search
            starts near the uncompressed model and the FLOPs penalty removes tokens where the task loss allows).
    """

    INITS = ("uniform", "full")

    def __init__(self, num_tokens: int, num_prefix: int, granularity: int = 1, init: str = "uniform"):
        super().__init__()
        if not isinstance(granularity, int) or granularity < 1:
            raise ValueError(f"granularity must be a positive integer, got {granularity!r}")
        if init not in self.INITS:
            raise ValueError(f"init must be one of {self.INITS}, got {init!r}")
        patches = num_tokens - num_prefix
        self.register_buffer("candidates", torch.arange(patches, 0, -granularity, dtype=torch.float32) + num_prefix)
        self.logits = nn.Parameter(torch.zeros(len(self.candidates)))
        if init == "full":
            with torch.no_grad():
                self.logits[0] = math.log(len(self.candidates)) + 1

    def probabilities(self) -> torch.Tensor:
        return self.logits.softmax(-1)

    def expected_kept(self) -> torch.Tensor:
        """``ceil(E[count])`` with the identity as its gradient: the count used for masks and FLOPs."""
        return _StraightCeil.apply(self.probabilities() @ self.candidates)

    def token_mask(self, kept: int, end: int, length: int) -> torch.Tensor:
        """``[length]`` mask: 0 for positions ``[kept, end)`` (removed here), 1 elsewhere, with the keep
        probabilities' gradient (position ``j`` is kept by every candidate count above ``j``)."""
        positions = torch.arange(length, device=self.logits.device, dtype=torch.float32)
        keep_probability = ((self.candidates[:, None] > positions[None, :]).float() * self.probabilities()[:, None]).sum(0)
        hard = torch.ones(length, device=self.logits.device)
        hard[kept:end] = 0
        return hard - keep_probability.detach() + keep_probability


class SearchState:
    """What one search forward pass carries from layer to layer."""

    def __init__(self):
        self.size = self.mask = None
        self.count = 0
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []


class RateSearch(nn.Module):
    """Holds the proxies of every layer and runs a model's encoder layers in search mode while active.

    Use as a context manager: ``with RateSearch(model) as search: out = model(...); flops = search.flops()``.
    The model's layers get their search forward only inside the ``with`` block.
    """

    def __init__(self, model: nn.Module, granularity: int = 1, num_prefix: int | None = None, init: str = "uniform"):
        super().__init__()
        self._model = [model]  # not a submodule: the proxies are this module's only parameters
        self.layers = encoder_layers(model)
        self.num_tokens, found = token_counts(model)
        self.num_prefix = found if num_prefix is None else num_prefix
        self.spec = FlopsSpec.from_config(model.config, self.num_prefix)
        # the first layer is never compressed (as in the paper): its class attention is not yet informative
        make = lambda: RateProxy(self.num_tokens, self.num_prefix, granularity, init)  # noqa: E731
        self.prune = nn.ModuleList([make() for _ in self.layers[1:]])
        self.merge = nn.ModuleList([make() for _ in self.layers[1:]])
        self.state = SearchState()
        self._saved = []

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self._saved.append(layer.__dict__.get("forward"))  # an instance-level forward (a hook library's)
            layer.forward = _search_forward(self, i, layer)
        return self

    def __exit__(self, *exc):
        for layer, saved in zip(self.layers, self._saved):
            if saved is None:
                del layer.forward  # back to the class's forward
            else:
                layer.forward = saved
        self._saved = []

    def flops(self) -> torch.Tensor:
        """Differentiable FLOPs of the last forward pass's counts (the first layer's counts are the full count)."""
        full = torch.tensor(float(self.num_tokens), device=self.prune[0].logits.device)
        prune = [full] + [p for p, _ in self.state.kept]
        merge = [full] + [m for _, m in self.state.kept]
        return count_flops(self.spec, prune, merge, minimum=straight_min, cut=_detach)

    def schedule(self) -> tuple[list[int], list[int]]:
        """The learned counts as a fixed, non-increasing integer schedule."""
        with torch.no_grad():
            prune = [self.num_tokens] + [int(p.expected_kept()) for p in self.prune]
            merge = [self.num_tokens] + [int(m.expected_kept()) for m in self.merge]
        return monotone_schedule(prune, merge, self.num_tokens)


def _search_forward(search: RateSearch, index: int, layer: nn.Module):
    parts = block_parts(layer)

    def forward(hidden_states, attention_mask=None, *args, **kwargs):
        state, P = search.state, search.num_prefix
        B, N, _ = hidden_states.shape
        if index == 0:
            state.size, state.mask, state.count, state.kept = hidden_states.new_ones(B, N, 1), hidden_states.new_ones(B, N), N, []
        attn_out, cls_attention = attend(parts, parts.norm_attention(hidden_states), state.size[..., 0].log(), state.mask)
        x = hidden_states + attn_out
        if index > 0:
            order = importance_order(cls_attention, P, valid=state.mask.detach() > 0.5)
            x, state.size, state.mask = (gather_tokens(t, order) for t in (x, state.size, state.mask))
            prune, merge = search.prune[index - 1], search.merge[index - 1]
            last = state.count
            kept_prune = prune.expected_kept()
            mid = min(last, int(kept_prune))
            if mid < last:
                state.mask = state.mask * prune.token_mask(mid, last, N)
            kept_merge = merge.expected_kept()
            out = min(mid, int(kept_merge))
            if out < mid:
                x, state.size = merge_tokens(x, state.size, out, P, end=mid, keep_sources=True)
                state.mask = state.mask * merge.token_mask(out, mid, N)
            state.count = out
            state.kept.append((kept_prune, kept_merge))
        return x + parts.mlp(parts.norm_mlp(x))

    return forward


def search_rates(model, pixels: torch.Tensor, labels: torch.Tensor, target_flops: float, steps: int = 200,
                 batch_size: int = 64, lr: float = 0.05, flops_weight: float = 200.0, granularity: int = 1,
                 init: str = "uniform", seed: int = 0, progress: bool = True) -> dict:
    """Learn a kept-token schedule for ``model`` at ``target_flops`` (a fraction of the uncompressed FLOPs).

    Args:
        model: a ViT/DeiT-style image classifier (frozen during the search; its training flag is restored).
        pixels, labels: the search images ``[N, C, H, W]`` and class labels ``[N]``.
        target_flops: FLOPs budget as a fraction in (0, 1] of the uncompressed model's.
        steps: optimizer steps (Adam on the rate logits only).
        flops_weight: λ of the FLOPs penalty on relative FLOPs (the paper's λ = 5 on GFLOPs of a 17.6-GFLOP
            DeiT-B is λ ≈ 1,500 here; smaller works on small data, the penalty is squared).
        granularity: gap between candidate counts.
        init: where the rate distributions start (:class:`RateProxy`).

    Returns:
        ``{"prune_kept", "merge_kept", "flops", "flops_ratio", "target_flops", "history"}``.
    """
    from tqdm.auto import tqdm

    from hf_compress.methods.diffrate.data import batches, check_images

    if not 0 < target_flops <= 1:
        raise ValueError(f"target_flops is a fraction of the model's FLOPs in (0, 1], got {target_flops}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    check_images(pixels, labels)
    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    model.eval()
    search = RateSearch(model, granularity=granularity, init=init).to(next(model.parameters()).device)
    full = count_flops(search.spec)
    optimizer = torch.optim.Adam(search.parameters(), lr=lr)
    history, epoch = [], 0
    data = iter(())
    try:
        with search, tqdm(range(steps), desc=f"DiffRate search (target {target_flops:.0%} FLOPs)",
                          disable=not progress) as bar:
            for step in bar:
                batch = next(data, None)
                if batch is None:
                    data, epoch = batches(pixels, labels, batch_size, seed=seed + epoch), epoch + 1
                    batch = next(data)
                x, y = batch
                logits = model(pixel_values=x).logits
                task = nn.functional.cross_entropy(logits, y)
                ratio = search.flops() / full
                loss = task + flops_weight * (ratio - target_flops) ** 2
                if not math.isfinite(loss.item()):
                    raise ValueError(f"the search loss became {loss.item()} at step {step}; lower lr")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                history.append({"step": step, "task_loss": task.item(), "flops_ratio": ratio.item()})
                bar.set_postfix(ce=f"{task.item():.3f}", flops=f"{ratio.item():.3f}")
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    prune, merge = search.schedule()
    flops = count_flops(search.spec, prune, merge)
    return {"prune_kept": prune, "merge_kept": merge, "flops": flops, "flops_ratio": flops / full,
            "target_flops": target_flops, "history": history}
