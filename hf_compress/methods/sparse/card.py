"""The pruned checkpoint's model card: the sparsity plan per layer (table and plot) and measured module bytes."""

from __future__ import annotations

import io
import re

from torch import nn

from hf_compress.formats.sparse import SparseLinear


def sparsity_rows(model: nn.Module) -> list[dict]:
    """Per pruned module: name, layer, shape, pattern, kept weights and stored bytes (read from its tensors)."""
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear):
            layer = re.search(r"\.(\d+)\.", name)
            n = mod.in_features * mod.out_features
            kept = int(mod.kept_mask().sum())
            rows.append({"name": name, "layer": int(layer.group(1)) if layer else -1, "shape": (mod.out_features, mod.in_features),
                         "pattern": mod.spec.pattern, "bits": mod.spec.bits, "weights": n, "kept": kept,
                         "sparsity": 1 - kept / n, "bytes": mod.stored_bytes(), "dense_element": _element_size(mod)})
    if not rows:
        raise ValueError("model has no pruned (SparseLinear) modules: prune it (or load a pruned checkpoint) first")
    return rows


def _element_size(mod: SparseLinear) -> int:
    return mod.bias.element_size() if mod.bias is not None else (mod.factor_a.element_size() if mod.spec.factor_block
                                                                   else (mod.weight.element_size() if mod.spec.bits is None else 4))


def layer_rows(rows: list[dict]) -> list[dict]:
    out = {}
    for r in rows:
        s = out.setdefault(r["layer"], {"layer": r["layer"], "weights": 0, "kept": 0, "bytes": 0})
        s["weights"] += r["weights"]
        s["kept"] += r["kept"]
        s["bytes"] += r["bytes"]
    return [{**s, "sparsity": 1 - s["kept"] / s["weights"]} for s in sorted(out.values(), key=lambda s: s["layer"])]


def sparsity_table(model: nn.Module, per: str = "layer") -> str:
    from hf_compress.report import format_bytes

    rows = sparsity_rows(model)
    if per == "module":
        out = ["| module | shape | pattern | bits | sparsity | stored |", "|---|---|---|---|---|---|"]
        out += [f"| {r['name']} | {r['shape'][0]}×{r['shape'][1]} | {r['pattern']} | {r['bits'] or 'dense dtype'} | "
                f"{r['sparsity']:.2%} | {format_bytes(r['bytes'])} |" for r in rows]
    else:
        out = ["| layer | weights | sparsity | stored |", "|---|---|---|---|"]
        out += [f"| {s['layer']} | {s['weights']:,} | {s['sparsity']:.2%} | {format_bytes(s['bytes'])} |" for s in layer_rows(rows)]
    return "\n".join(out)


def plot_sparsity(model: nn.Module, path, title: str | None = None):
    """Bars: sparsity per decoder layer; the dashed line is the overall ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = layer_rows(sparsity_rows(model))
    total = 1 - sum(s["kept"] for s in layers) / sum(s["weights"] for s in layers)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.bar([s["layer"] for s in layers], [s["sparsity"] for s in layers], color="tab:blue", label="layer sparsity")
    ax.axhline(total, color="black", linestyle="--", label=f"overall {total:.1%}")
    ax.set_ylim(0, 1)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("fraction pruned")
    ax.set_title(title or f"Per-layer sparsity ({total:.1%} overall)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def render(artifact, model) -> tuple[str, dict, bytes]:
    """``Method.card["quantized"]`` of the pruning methods."""
    from hf_compress.integrations.model_card import settings_rows
    from hf_compress.registry import method_for_quant_method
    from hf_compress.report import format_bytes

    if model is None:
        from transformers import AutoModelForCausalLM

        from hf_compress import register

        register()
        model = AutoModelForCausalLM.from_pretrained(artifact.folder)
    quant = artifact.config["quantization_config"]
    method = method_for_quant_method(quant["quant_method"])
    rows = sparsity_rows(model)
    weights, kept, stored = (sum(r[k] for r in rows) for k in ("weights", "kept", "bytes"))
    dense = sum(r["weights"] * r["dense_element"] for r in rows)
    patterns = sorted({r["pattern"] for r in rows})
    storage = "; ".join("kept values + log2(M)-bit indices" if p != "unstructured" else "bitmask + kept values"
                        for p in patterns) + ("; kept values as integer codes" if any(r["bits"] for r in rows) else "")
    buf = io.BytesIO()
    plot_sparsity(model, buf)
    settings = {k: v for k, v in quant.items() if k not in ("plan", "report", "quant_method") and v not in (None, [], {})}
    return "pruned", {
        "method_name": method.title if method else quant["quant_method"], "paper": method.paper if method else None,
        "storage": storage, "sparsity": f"{1 - kept / weights:.2%}", "pruned_weights": f"{weights - kept:,}",
        "planned_weights": f"{weights:,}", "module_bytes": format_bytes(stored), "module_dense_bytes": format_bytes(dense),
        "dense_dtype": str(model.dtype).removeprefix("torch."), "module_ratio": f"{stored / dense:.3f}",
        "module_fp32_bytes": format_bytes(weights * 4), "module_fp32_ratio": f"{stored / (weights * 4):.3f}",
        "settings_rows": settings_rows(settings), "plan_table": sparsity_table(model, "layer"),
        "module_table": sparsity_table(model, "module"),
        "tags": ["pruned", quant["quant_method"].removeprefix("hfc_"), *patterns]}, buf.getvalue()
