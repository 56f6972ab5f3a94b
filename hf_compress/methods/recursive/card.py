"""Model-card sections of the recursive model and of its relaxed LoRA adapter (rendered by ``integrations.model_card``)."""

from __future__ import annotations

from hf_compress.integrations.model_card import figure, png, settings_rows
from hf_compress.methods.recursive import PAPER
from hf_compress.methods.recursive.sharing import unique_block


def recursive_card(artifact, model) -> tuple[str, dict, bytes]:
    c = artifact.config
    layers, loops, scheme = c["num_hidden_layers"], c.get("num_loops", 2), c.get("recursion_scheme", "cycle")
    blocks = [unique_block(p, layers, loops, scheme) for p in range(layers)]
    per_loop = layers // loops
    table = ["| loop | positions | unique blocks |", "|---|---|---|"]
    table += [f"| {i + 1} | {i * per_loop}–{(i + 1) * per_loop - 1} | {', '.join(map(str, blocks[i * per_loop:(i + 1) * per_loop]))} |"
              for i in range(loops)]
    fig, ax = figure()
    ax.scatter(range(layers), blocks, c=[p // per_loop for p in range(layers)], cmap="viridis", s=28)
    ax.set_xlabel("unrolled position"), ax.set_ylabel("unique block")
    ax.set_title(f"{layers // loops} unique blocks × {loops} loops ({scheme})")
    settings = {k: c.get(k) for k in ("num_hidden_layers", "num_loops", "recursion_scheme", "recursion_init", "tie_norms",
                                      "early_exit_loss_weight", "early_exit_threshold")}
    params = _stored_params(artifact)
    return "recursive", {"num_unique": layers // loops, "num_loops": loops, "num_layers": layers, "scheme": scheme,
            "init": c.get("recursion_init"), "paper": PAPER, "settings_rows": settings_rows(settings),
            "plan_table": "\n".join(table), "params": f"{params:,}", "tags": ["recursive-transformer"]}, png(fig)


def relaxed_lora_card(artifact, model) -> tuple[str, dict, bytes]:
    a = artifact.adapter_config
    ranks = a.get("rank_pattern") or {m: a.get("r") for m in a.get("target_modules") or []}
    fig, ax = figure(7, 3.2)
    names = sorted(ranks)
    ax.bar(names, [ranks[n] for n in names], color="tab:blue")
    ax.set_ylabel("LoRA rank (every unrolled position)"), ax.set_title("Relaxed LoRA ranks per module type")
    ax.tick_params(axis="x", labelrotation=30)
    table = ["| module type | rank |", "|---|---|"] + [f"| {n} | {ranks[n]} |" for n in names]
    settings = {k: a.get(k) for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "train_shared_weights")}
    return "relaxed_lora", {"peft_type": a.get("peft_type"), "paper": PAPER, "settings_rows": settings_rows(settings),
            "plan_table": "\n".join(table), "tags": ["relaxed-recursive-lora", "lora"]}, png(fig)




def _stored_params(artifact) -> int:
    from safetensors import safe_open

    total = 0
    for f in artifact.weight_files:
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                shape = fh.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total
