"""The resolved plan of a quantized model, as a table and a per-layer bit-width plot.

Everything is read from the packed modules themselves, so the numbers are what the checkpoint stores: code
bits are the mean code width, bits/weight add scales, zero points and per-column width bytes exactly.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from torch import nn

from hf_compress.formats.linear import PackedLinear
from hf_compress.report import module_bits


def plan_rows(model: nn.Module) -> list[dict]:
    """One row per packed module: name, decoder layer, shape, widths, code bits and realised bits/weight."""
    rows = []
    for name, mod in model.named_modules():
        if not isinstance(mod, PackedLinear):
            continue
        spec, n = mod.spec, mod.in_features * mod.out_features
        layer = re.search(r"\.(\d+)\.", name)
        widths = dict(spec.bit_groups) if spec.is_mixed else {spec.bits: mod.in_features}
        rows.append({"name": name, "layer": int(layer.group(1)) if layer else -1, "shape": (mod.out_features, mod.in_features),
                     "group_size": spec.group_size, "widths": widths, "weights": n,
                     "code_bits": spec.code_bits(mod.in_features), "bits_per_weight": module_bits(mod) / n})
    if not rows:
        raise ValueError("model has no hf-compress packed modules: quantize it (or load a quantized checkpoint) first")
    return rows


def layer_summary(rows: list[dict]) -> list[dict]:
    """Rows aggregated per decoder layer (weighted by parameter count)."""
    acc: dict[int, dict] = defaultdict(lambda: {"weights": 0, "code": 0.0, "bits": 0.0, "widths": defaultdict(int)})
    for r in rows:
        a = acc[r["layer"]]
        a["weights"] += r["weights"]
        a["code"] += r["code_bits"] * r["weights"]
        a["bits"] += r["bits_per_weight"] * r["weights"]
        for b, n in r["widths"].items():
            a["widths"][b] += n * r["shape"][0]
    return [{"layer": k, "weights": a["weights"], "code_bits": a["code"] / a["weights"],
             "bits_per_weight": a["bits"] / a["weights"],
             "width_share": {b: n / a["weights"] for b, n in sorted(a["widths"].items())}} for k, a in sorted(acc.items())]


def overall_bits(rows) -> tuple[float, float]:
    """(code bits, realised bits/weight) over all rows, weighted by parameter count."""
    total = sum(r["weights"] for r in rows)
    return (sum(r["code_bits"] * r["weights"] for r in rows) / total,
            sum(r["bits_per_weight"] * r["weights"] for r in rows) / total)


def plan_table(model: nn.Module, per: str = "layer") -> str:
    """Markdown table of the plan, ``per="layer"`` (default) or ``"module"``, with the overall realised bits."""
    rows = plan_rows(model)
    if per == "module":
        out = ["| module | shape | group | widths (columns) | code bits | bits/weight |", "|---|---|---|---|---|---|"]
        out += [f"| {r['name']} | {r['shape'][0]}×{r['shape'][1]} | {r['group_size']} | "
                f"{', '.join(f'{b}b: {n}' for b, n in sorted(r['widths'].items()))} | {r['code_bits']:.3f} | {r['bits_per_weight']:.3f} |"
                for r in rows]
    elif per == "layer":
        out = ["| layer | weights | share of weights per width | code bits | bits/weight |", "|---|---|---|---|---|"]
        out += [f"| {s['layer']} | {s['weights']:,} | {', '.join(f'{b}b {v:.0%}' for b, v in s['width_share'].items())} | "
                f"{s['code_bits']:.3f} | {s['bits_per_weight']:.3f} |" for s in layer_summary(rows)]
    else:
        raise ValueError(f"per must be 'layer' or 'module', got {per!r}")
    code, bits = overall_bits(rows)
    out.append(f"\nOverall: {code:.4f} code bits, {bits:.4f} bits per weight (scales, zero points and width maps included).")
    return "\n".join(out)


def plot_plan(model: nn.Module, path, title: str | None = None):
    """Per-layer plot: bars stacked by the share of weights at each width, realised bits/weight as a line.

    ``path`` is a file name (returned as a ``Path``) or a binary file object (PNG bytes written to it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = plan_rows(model)
    summary = layer_summary(rows)
    layers = [s["layer"] for s in summary]
    widths = sorted({b for s in summary for b in s["width_share"]})
    fig, ax = plt.subplots(figsize=(9, 3.8))
    bottom = [0.0] * len(summary)
    cmap = plt.get_cmap("viridis", max(len(widths), 2))
    for i, b in enumerate(widths):
        part = [s["width_share"].get(b, 0.0) * b for s in summary]  # contribution of width b to the mean code bits
        ax.bar(layers, part, bottom=bottom, color=cmap(i), label=f"{b}-bit codes")
        bottom = [x + y for x, y in zip(bottom, part)]
    ax.plot(layers, [s["bits_per_weight"] for s in summary], color="black", marker=".", label="bits/weight (realised)")
    code, bits = overall_bits(rows)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("bits per weight")
    ax.set_title(title or f"Per-layer bit widths: {code:.3f} code bits, {bits:.3f} bits/weight overall")
    ax.legend(fontsize=7, ncol=len(widths) + 1, loc="lower right")
    fig.tight_layout()
    if isinstance(path, (str, Path)):
        path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path
