"""Model-card section of a CSKV model: per-layer latent ranks, the window, the latents' width, the cache saving."""

from __future__ import annotations

from hf_compress.integrations.model_card import figure, png, settings_rows


def cskv_card(artifact, model) -> tuple[str, dict, bytes]:
    from hf_compress.methods.cskv import PAPER

    c, cfg = artifact.config["cskv"], artifact.config
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_dim = cfg["num_key_value_heads"] * head_dim
    table = ["| layer | key latent rank | value latent rank | of kv_dim |", "|---|---|---|---|"]
    table += [f"| {i} | {rk} | {rv} | {kv_dim} |" for i, (rk, rv) in enumerate(zip(c["rank_k"], c["rank_v"]))]
    kept = (sum(c["rank_k"]) + sum(c["rank_v"])) / (2 * kv_dim * len(c["rank_k"]))
    fig, ax = figure()
    xs = range(len(c["rank_k"]))
    ax.bar([x - 0.2 for x in xs], c["rank_k"], width=0.4, label="key latent rank")
    ax.bar([x + 0.2 for x in xs], c["rank_v"], width=0.4, label="value latent rank")
    ax.axhline(kv_dim, color="grey", ls=":", label=f"kv_dim = {kv_dim}")
    ax.set_xlabel("decoder layer"), ax.set_ylabel("channels cached"), ax.legend()
    ax.set_title(f"CSKV: {100 * (1 - kept):.0f} % of key/value channels removed")
    settings = {"channel reduction": f"{100 * (1 - kept):.1f} %", "full-precision window": c["window"],
                "latent bits": c["latent_bits"], "group size": c["group_size"]}
    return "cskv", {"paper": PAPER, "reduction": f"{100 * (1 - kept):.0f}", "window": c["window"],
                    "latent_bits": c["latent_bits"], "settings_rows": settings_rows(settings),
                    "plan_table": "\n".join(table), "tags": ["kv-cache", "cskv", "low-rank"]}, png(fig)
