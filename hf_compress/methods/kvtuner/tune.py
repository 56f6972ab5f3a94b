"""``kv_plan``: calibrate, score every layer under every candidate pair, search the plan under a bit budget."""

from __future__ import annotations

from hf_compress.kv_cache.plan import PAIR_NAMES, KVPlan, pair_name
from hf_compress.methods.kvtuner.search import knapsack_search, nsga2_search, plan_error
from hf_compress.methods.kvtuner.sensitivity import pair_errors

DEFAULT_PAIRS = ("KV8", "K8V4", "KV4", "K4V2", "KV2")  # the released code's standard candidate list
SEARCHES = {"knapsack": knapsack_search, "nsga2": nsga2_search}


def parse_pairs(names) -> list[tuple[int, int]]:
    """Candidate names (``"K8V4"``) → (key bits, value bits); unknown names raise naming the choices."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in names if n not in PAIR_NAMES]
    if bad or not names:
        raise ValueError(f"unknown KV pair(s) {bad or names}; choose from {sorted(PAIR_NAMES)}")
    return [PAIR_NAMES[n] for n in names]


def check_budget(avg_bits, candidates) -> None:
    cheapest = min(k + v for k, v in candidates) / 2
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float)) or avg_bits < cheapest:
        raise ValueError(f"average-bit budget {avg_bits!r} is below the cheapest candidate pair ({cheapest} bits)")


def kv_plan(model, batches, avg_bits: float, pairs=DEFAULT_PAIRS, search: str = "knapsack", group_size: int = 32,
            residual_length: int = 32, errors=None, progress: bool = True, **search_kwargs) -> KVPlan:
    """Search a per-layer KV plan for ``model``.

    Args:
        model: a transformers causal LM.
        batches: calibration token windows ``[N, T]`` (ignored when ``errors`` is given).
        avg_bits: budget on the mean nominal K/V width over layers (e.g. 3.0).
        pairs: candidate (K, V) pair names.
        search: ``"knapsack"`` (exact) or ``"nsga2"`` (Optuna, as released).
        errors: precomputed :func:`pair_errors` table (to compare searches without recalibrating).
    """
    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r}; choose one of {sorted(SEARCHES)}")
    candidates = parse_pairs(pairs)
    check_budget(avg_bits, candidates)  # before the calibration pass, not after it
    if errors is None:
        errors = pair_errors(model, batches, candidates, group_size, progress=progress)
    choice = SEARCHES[search](errors, candidates, avg_bits, **search_kwargs)
    plan = KVPlan([candidates[j][0] for j in choice], [candidates[j][1] for j in choice], group_size,
                  residual_length)
    plan.extra = {"search": search, "avg_bits_budget": float(avg_bits), "pairs": [pair_name(*p) for p in candidates],
                  "proxy_error": plan_error(errors, choice),
                  "layer_errors": [[round(float(e), 6) for e in row] for row in errors]}
    return plan
