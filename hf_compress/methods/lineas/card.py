"""Model card of a LinEAS adapter (rendered by ``integrations.model_card``): the maps' deviation from the identity per
steered module, as a plot and a table, and the settings."""

from __future__ import annotations

from hf_compress.integrations.model_card import figure, png, settings_rows

from hf_compress.methods.lineas import PAPER

SETTINGS = ("peft_type", "task_type", "target_modules", "strength", "l1_penalty", "group_penalty")


def lineas_card(artifact, model) -> tuple[str, dict, bytes]:
    a = artifact.adapter_config
    rows = _deviations(artifact)
    fig, ax = figure(8, 3.2)
    x = range(len(rows))
    ax.plot(x, [r[1] for r in rows], marker="o", label="RMS(ω − 1)")
    ax.plot(x, [r[2] for r in rows], marker="s", label="RMS(b)")
    ax.set_xlabel("steered module (forward order)"), ax.set_title("LinEAS maps: deviation from the identity")
    ax.legend()
    table = ["| module | RMS(ω − 1) | RMS(b) | active coordinates |", "|---|---|---|---|"]
    table += [f"| `{name}` | {w:.4g} | {b:.4g} | {n} |" for name, w, b, n in rows]
    params = sum(2 * int(r[3].split("/")[1]) for r in rows)
    return "lineas", {"peft_type": a.get("peft_type"), "paper": PAPER,
                      "settings_rows": settings_rows({k: a.get(k) for k in SETTINGS}), "plan_table": "\n".join(table),
                      "steered": str(len(rows)), "params": f"{params:,}", "strength": a.get("strength"),
                      "tags": ["lineas", "activation-steering"]}, png(fig)


def _deviations(artifact) -> list[tuple[str, float, float, str]]:
    """``(module, RMS(ω − 1), RMS(b), "coordinates moved/d")`` per steered module of the adapter files."""
    from safetensors.torch import load_file

    tensors = {}
    for f in artifact.weight_files:
        tensors.update(load_file(f))
    rows = []
    for key in sorted(k for k in tensors if k.endswith(".lineas_omega")):
        name = key.removeprefix("base_model.model.").removesuffix(".lineas_omega")
        dw = tensors[key].float() - 1
        db = tensors[key.replace(".lineas_omega", ".lineas_bias")].float()
        moved = int(((dw != 0) | (db != 0)).sum())
        rows.append((name, dw.pow(2).mean().sqrt().item(), db.pow(2).mean().sqrt().item(), f"{moved}/{dw.numel()}"))
    return sorted(rows, key=lambda r: [int(t) if t.isdigit() else t for t in r[0].split(".")])
