"""KVTuner's search: one (K, V) pair per layer, trading the summed attention-output error against average bits.

Two solvers over the same objective (the per-layer errors add up — the proxy KVTuner's sensitivity analysis
justifies, §4.2):

* :func:`knapsack_search` — exact multiple-choice knapsack by dynamic programming over the total bit count.
  With a handful of pairs and a few dozen layers the table is tiny (layers × 2·16·layers), so the optimum is
  cheaper to compute than to sample.
* :func:`nsga2_search` — the released code's choice, Optuna's NSGA-II on (error, average bits) with the budget as
  a constraint; it returns the best feasible trial. Kept to compare against the exact answer (it can only match
  or lose on this objective); it pays off only when the objective is a real evaluation rather than a sum.
"""

from __future__ import annotations

import math

import torch


def _check(errors: torch.Tensor, pairs, avg_bits: float):
    if errors.dim() != 2 or errors.shape[1] != len(pairs):
        raise ValueError(f"errors must be [layers, {len(pairs)}], got {tuple(errors.shape)}")
    cheapest = min(k + v for k, v in pairs) / 2
    if not isinstance(avg_bits, (int, float)) or avg_bits < cheapest:
        raise ValueError(f"average-bit budget {avg_bits!r} is below the cheapest candidate pair ({cheapest} bits)")


def knapsack_search(errors: torch.Tensor, pairs: list[tuple[int, int]], avg_bits: float) -> list[int]:
    """Exact minimum of ``Σ_l errors[l, choice_l]`` subject to ``Σ_l (k_l + v_l) ≤ 2·L·avg_bits``; returns the
    chosen pair index per layer."""
    _check(errors, pairs, avg_bits)
    layers = errors.shape[0]
    budget = int(math.floor(2 * layers * avg_bits + 1e-9))
    cost = [k + v for k, v in pairs]
    err = errors.double().tolist()
    inf = float("inf")
    best = [0.0] + [inf] * budget  # best[b]: least error of the layers so far using exactly b bits
    choice = []
    for l in range(layers):
        new = [inf] * (budget + 1)
        pick = [-1] * (budget + 1)
        for b, e in enumerate(best):
            if e == inf:
                continue
            for j, c in enumerate(cost):
                if b + c <= budget and e + err[l][j] < new[b + c]:
                    new[b + c], pick[b + c] = e + err[l][j], j
        best = new
        choice.append(pick)
    b = min(range(budget + 1), key=lambda i: best[i])
    out = []
    for l in reversed(range(layers)):
        j = choice[l][b]
        out.append(j)
        b -= cost[j]
    return out[::-1]


def nsga2_search(errors: torch.Tensor, pairs: list[tuple[int, int]], avg_bits: float, n_trials: int = 300,
                 seed: int = 0) -> list[int]:
    """Optuna NSGA-II over per-layer pair indices, objectives (summed error, average bits), constraint
    ``average bits ≤ avg_bits``; returns the lowest-error feasible trial (needs ``pip install optuna``)."""
    _check(errors, pairs, avg_bits)
    try:
        import optuna
    except ImportError as exc:  # optional extra
        raise ImportError("the NSGA-II search needs optuna: pip install 'hf-compress[kvtuner]'") from exc
    layers = errors.shape[0]
    err = errors.double().tolist()

    def bits_of(params):
        return sum(sum(pairs[params[f"l{l}"]]) for l in range(layers)) / (2 * layers)

    def objective(trial):
        idx = [trial.suggest_categorical(f"l{l}", list(range(len(pairs)))) for l in range(layers)]
        violation = [bits_of(trial.params) - avg_bits]
        trial.set_user_attr("constraint", violation)
        if hasattr(trial, "set_constraint"):  # optuna >= 5; earlier versions read `constraints_func`
            trial.set_constraint("avg_bits", violation[0])
        return sum(err[l][j] for l, j in enumerate(idx)), bits_of(trial.params)

    modern = hasattr(optuna.trial.Trial, "set_constraint")
    sampler = optuna.samplers.NSGAIISampler(
        seed=seed, **({} if modern else {"constraints_func": lambda t: t.user_attrs["constraint"]}))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    # Seed with the uniform plan nearest the budget so a feasible answer exists from the first generation.
    feasible = [j for j, (k, v) in enumerate(pairs) if (k + v) / 2 <= avg_bits]
    start = max(feasible, key=lambda j: sum(pairs[j]))
    study.enqueue_trial({f"l{l}": start for l in range(layers)})
    study.optimize(objective, n_trials=n_trials, show_progress_bar=False)
    ok = [t for t in study.trials if t.values is not None and t.user_attrs["constraint"][0] <= 1e-9]
    best = min(ok, key=lambda t: t.values[0])
    return [best.params[f"l{l}"] for l in range(layers)]


def plan_error(errors: torch.Tensor, choice: list[int]) -> float:
    return float(sum(errors[l, j] for l, j in enumerate(choice)))
