"""Model-card section of a token-reduced ViT/DeiT (rendered by ``integrations.model_card``)."""

from __future__ import annotations

from types import SimpleNamespace

from hf_compress.integrations.model_card import figure, png, settings_rows
from hf_compress.methods.diffrate import PAPER
from hf_compress.methods.diffrate.flops import FlopsSpec, count_flops


def diffrate_card(artifact, model) -> tuple[str, dict, bytes]:
    c = artifact.config
    layers, prefix = c["num_hidden_layers"], c.get("num_prefix_tokens", 1)
    spec = FlopsSpec.from_config(SimpleNamespace(**{k: c.get(k) for k in (
        "image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size", "num_hidden_layers")},
        num_labels=len(c.get("id2label") or {}) or 2), prefix)
    full = [spec.num_tokens] * layers
    prune, merge = c.get("prune_kept") or full, c.get("merge_kept") or full
    flops, full_flops = count_flops(spec, prune, merge), count_flops(spec)
    table = ["| layer | tokens in | after pruning | after merging |", "|---|---|---|---|"]
    table += [f"| {i} | {n} | {p} | {m} |" for i, (n, p, m) in enumerate(zip([spec.num_tokens, *merge[:-1]], prune, merge))]
    fig, ax = figure()
    ax.step(range(layers), prune, where="mid", label="after pruning", color="tab:orange")
    ax.step(range(layers), merge, where="mid", label="after merging", color="tab:blue")
    ax.set_xlabel("encoder layer"), ax.set_ylabel("tokens kept (incl. prefix)"), ax.set_ylim(0, spec.num_tokens + 1)
    ax.set_title(f"DiffRate schedule: {flops / full_flops:.0%} of the FLOPs"), ax.legend()
    search = c.get("diffrate_search") or {}
    origin = "given, not searched"
    if search.get("source") == "search":
        origin = f"learned by the differentiable search under a FLOPs target of {search.get('target_flops')}"
    settings = {"num_prefix_tokens": prefix, "tokens per image": spec.num_tokens, **search}
    return "diffrate", {"paper": PAPER, "origin": origin, "architecture": (c.get("architectures") or ["?"])[0],
                        "flops": f"{flops / 1e6:.2f} M", "full_flops": f"{full_flops / 1e6:.2f} M",
                        "flops_ratio": f"{flops / full_flops:.1%}", "plan_table": "\n".join(table),
                        "settings_rows": settings_rows(settings), "tags": ["diffrate", "token-merging", "vision"]}, png(fig)
