"""Early exit after each loop of a CYCLE recursive model, and the continuous depth-wise batching simulation.

Every loop of a CYCLE model applies the same blocks, so a token that is confident after loop b can leave and a
waiting token can take its slot at loop 1 in the same batch (continuous depth-wise batching, CDB). Like the
paper, throughput is *simulated* from measured per-token exit loops: one "loop step" (the batch through the K
shared blocks once) is the time unit, which holds when every slot runs the same weights; the KV entries that
an exited token still owes the later loops are filled by computing those loops, as the paper's simulation
assumes (their cost is not counted — say so wherever the numbers are shown).
"""

from __future__ import annotations

from collections import deque

import torch


def _unwrap(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "loop_boundaries"):
        raise TypeError(f"early exit needs a recursive model (RecursiveLlamaForCausalLM), got {type(base).__name__}")
    return base


def loop_hidden_states(model, input_ids: torch.Tensor, **forward_kwargs):
    """``(hidden state at each early loop boundary, model output)``, with gradients when enabled (a learned exit
    head trains on them)."""
    base = _unwrap(model)
    captured, handles = {}, []
    for b, position in enumerate(base.loop_boundaries()[:-1]):
        handles.append(base.model.layers[position].register_forward_hook(
            lambda m, i, o, b=b: captured.__setitem__(b, o[0] if isinstance(o, tuple) else o)))
    try:
        out = model(input_ids=input_ids, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    return [captured[b] for b in sorted(captured)], out


@torch.no_grad()
def loop_logits(model, input_ids: torch.Tensor, **forward_kwargs) -> tuple[list[torch.Tensor], object]:
    """Logits after every loop (shared final norm + head on the hidden state at each loop boundary); the last
    entry is the model's own output. Returns ``(logits per loop, model output)``."""
    hiddens, out = loop_hidden_states(model, input_ids, **forward_kwargs)
    base = _unwrap(model)
    return [base.exit_logits(h) for h in hiddens] + [out.logits], out


def oracle_exit_loops(logits_per_loop: list[torch.Tensor]) -> torch.Tensor:
    """1-based loop at which each token could exit: the first whose argmax equals the final loop's (the
    paper's oracle rule)."""
    final = logits_per_loop[-1].argmax(-1)
    exits = torch.full_like(final, len(logits_per_loop))
    for b in reversed(range(len(logits_per_loop) - 1)):
        exits = torch.where(logits_per_loop[b].argmax(-1) == final, torch.full_like(final, b + 1), exits)
    return exits


def confidence_exit_loops(logits_per_loop: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """1-based loop at which each token exits under a max-probability threshold (last loop if never)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    exits = torch.full(logits_per_loop[-1].shape[:-1], len(logits_per_loop), dtype=torch.long,
                       device=logits_per_loop[-1].device)
    for b in reversed(range(len(logits_per_loop) - 1)):
        confident = logits_per_loop[b].float().softmax(-1).amax(-1) >= threshold
        exits = torch.where(confident, torch.full_like(exits, b + 1), exits)
    return exits


@torch.no_grad()
def early_exit_generate(model, input_ids: torch.Tensor, max_new_tokens: int, threshold: float | None = None):
    """Greedy generation that takes each token from the first loop confident above ``threshold`` (default: the
    config's ``early_exit_threshold``). Returns ``(ids, exit loop per generated token)``; batch size 1."""
    base = _unwrap(model)
    threshold = threshold if threshold is not None else base.config.early_exit_threshold
    if threshold is None:
        raise ValueError("no threshold: pass threshold= or set config.early_exit_threshold")
    if input_ids.shape[0] != 1:
        raise ValueError("early_exit_generate decodes one sequence at a time (batch size 1)")
    from transformers import DynamicCache

    cache = DynamicCache(config=base.config)
    ids, step_input, exits = input_ids, input_ids, []
    for _ in range(max_new_tokens):
        logits, out = loop_logits(model, step_input, cache=cache, use_cache=True)
        last = [lg[:, -1:] for lg in logits]
        loop = int(confidence_exit_loops(last, threshold).item())
        token = last[loop - 1].argmax(-1)
        exits.append(loop)
        ids = torch.cat([ids, token], dim=1)
        step_input, cache = token, out.past_key_values
        eos = base.generation_config.eos_token_id
        if eos is not None and int(token) in (eos if isinstance(eos, list) else [eos]):
            break
    return ids, exits


def simulate_throughput(trajectories: list[list[int]], num_loops: int, batch_size: int) -> dict[str, float]:
    """Tokens per loop step for a batch of ``batch_size`` slots serving ``trajectories`` (one list of exit loops
    per request, one entry per generated token):

    - ``vanilla``: static batches, every token runs all loops, a batch lasts as long as its longest request;
    - ``vanilla_early_exit``: static batches, a token step lasts until the slowest token of the batch exits;
    - ``depthwise``: continuous depth-wise batching — a slot starts its next token (or a queued request) the step
      after its token exits.
    """
    if batch_size < 1 or not trajectories:
        raise ValueError("need batch_size >= 1 and at least one trajectory")
    if any(not 1 <= e <= num_loops for t in trajectories for e in t):
        raise ValueError(f"exit loops must lie in [1, {num_loops}]")
    tokens = sum(len(t) for t in trajectories)
    vanilla = early = 0
    for start in range(0, len(trajectories), batch_size):
        batch = trajectories[start:start + batch_size]
        longest = max(len(t) for t in batch)
        vanilla += longest * num_loops
        early += sum(max((t[i] for t in batch if i < len(t)), default=0) for i in range(longest))
    queue = deque(deque(t) for t in trajectories if t)
    slots: list[list] = []  # [remaining tokens of the request, loops left on the current token]
    steps = 0
    while queue or slots:
        while len(slots) < batch_size and queue:
            request = queue.popleft()
            slots.append([request, request[0]])
        steps += 1
        for slot in slots:
            slot[1] -= 1
        still = []
        for request, left in slots:
            if left > 0:
                still.append([request, left])
                continue
            request.popleft()
            if request:
                still.append([request, request[0]])
        slots = still
    return {"tokens": tokens, "vanilla": tokens / vanilla, "vanilla_early_exit": tokens / early,
            "depthwise": tokens / steps}
