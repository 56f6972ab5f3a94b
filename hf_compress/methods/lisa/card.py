"""Model card of a LISA adapter (rendered by ``integrations.model_card``): what it stores and how it was trained."""

from __future__ import annotations

import re

from hf_compress.integrations.model_card import figure, png, settings_rows

PAPER = "[Pan et al., arXiv 2403.17919](https://arxiv.org/abs/2403.17919)"
SETTINGS = ("peft_type", "task_type", "num_active_layers", "interval_steps", "seed", "train_embeddings", "train_head",
            "train_final_norm", "release_state", "layers", "base_fingerprint")


def lisa_card(artifact, model) -> tuple[str, dict, bytes]:
    a = artifact.adapter_config
    parts = _stored_parts(artifact)
    names = sorted(parts, key=_part_order)
    fig, ax = figure(7, 3.2)
    ax.bar(names, [parts[n][1] / 1e6 for n in names], color="tab:green")
    ax.set_ylabel("parameters stored (M)"), ax.set_title("LISA adapter: tensors that training changed")
    ax.tick_params(axis="x", labelrotation=45)
    table = ["| part | tensors | parameters |", "|---|---|---|"]
    table += [f"| {n} | {parts[n][0]} | {parts[n][1]:,} |" for n in names]
    layers = a.get("stored_layers") or []
    return "lisa", {"peft_type": a.get("peft_type"), "paper": PAPER, "settings_rows": settings_rows({k: a.get(k) for k in SETTINGS}),
                    "plan_table": "\n".join(table), "stored_layers": ", ".join(map(str, layers)) or "none",
                    "params": f"{sum(c for _, c in parts.values()):,}", "tags": ["lisa"]}, png(fig)


def _stored_parts(artifact) -> dict[str, tuple[int, int]]:
    """``{part: (tensors, parameters)}`` of the adapter files, a part being one decoder layer or a named module."""
    from safetensors import safe_open

    parts: dict[str, list[int]] = {}
    for f in artifact.weight_files:
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                n = 1
                for d in fh.get_slice(key).get_shape():
                    n *= d
                entry = parts.setdefault(_part(key.removeprefix("base_model.model.")), [0, 0])
                entry[0] += 1
                entry[1] += n
    return {k: (v[0], v[1]) for k, v in parts.items()}


def _part(name: str) -> str:
    match = re.search(r"(^|\.)(\d+)\.", name)
    return f"layer {match.group(2)}" if match else name.rsplit(".", 1)[0]


def _part_order(part: str):
    return (0, int(part.split()[1]), "") if part.startswith("layer ") else (1, 0, part)
