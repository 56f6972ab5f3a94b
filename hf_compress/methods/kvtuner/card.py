"""Model-card section of a model carrying a KV cache plan: the per-layer table and a width plot."""

from __future__ import annotations

from hf_compress.integrations.model_card import figure, png, settings_rows
from hf_compress.kv_cache.plan import KVPlan


def kvtuner_card(artifact, model) -> tuple[str, dict, bytes]:
    from hf_compress.methods.kvtuner import PAPER

    plan = KVPlan.from_dict(artifact.config["kv_cache_plan"])
    errors = plan.extra.get("layer_errors")
    pairs = plan.extra.get("pairs")
    table = ["| layer | key bits | value bits | pair | attention-output error of the pair |", "|---|---|---|---|---|"]
    for l, (k, v) in enumerate(zip(plan.key_bits, plan.value_bits)):
        name = plan.pairs()[l]
        err = errors[l][pairs.index(name)] if errors and pairs and name in pairs else None
        table.append(f"| {l} | {k} | {v} | {name} | {'' if err is None else f'{err:.2e}'} |")
    fig, ax = figure()
    xs = range(plan.num_layers)
    ax.step(xs, plan.key_bits, where="mid", label="key bits", lw=2)
    ax.step(xs, plan.value_bits, where="mid", label="value bits", lw=2, ls="--")
    ax.set_xlabel("decoder layer"), ax.set_ylabel("bits"), ax.set_yticks(sorted(set(plan.key_bits + plan.value_bits)))
    ax.set_title(f"KV plan: {plan.average_bits:.2f} average bits"), ax.legend()
    settings = {"search": plan.extra.get("search"), "budget (average bits)": plan.extra.get("avg_bits_budget"),
                "candidate pairs": ", ".join(pairs or []), "group size": plan.group_size,
                "full-precision window": plan.residual_length}
    return "kvtuner", {"paper": PAPER, "avg_bits": f"{plan.average_bits:.2f}", "group_size": plan.group_size,
                       "residual_length": plan.residual_length, "settings_rows": settings_rows(settings),
                       "plan_table": "\n".join(table), "tags": ["kv-cache", "kvtuner"]}, png(fig)
