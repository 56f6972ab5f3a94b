"""Model-card section of LayerNorm-free checkpoints, and recognition of the plain-GPT-2 ("compatible") export,
which carries no model type of its own."""

from __future__ import annotations

import re

from hf_compress.integrations.model_card import figure, png, settings_rows
from hf_compress.methods.ln_free import PAPER
from hf_compress.methods.ln_free.export import COMPAT_SCALE

COMPAT_MIN_EPS = 1e6  # the compatible export sets eps = 1e12; no trained model uses eps >= 1e6


def recognize(config: dict) -> str | None:
    """``ln_free_compatible`` for a plain GPT-2 config whose norms were turned into near-constant divisions."""
    if config.get("model_type") == "gpt2" and config.get("layer_norm_epsilon", 0) >= COMPAT_MIN_EPS:
        return "ln_free_compatible"
    return None


def ln_free_compatible_card(artifact, model) -> tuple[str, dict, bytes]:
    return ln_free_card(artifact, model, compatible=True)


def _norm_scales(artifact, scale: float) -> dict[str, list[float]]:
    """Mean |weight| of each norm per layer, read from the safetensors headers' tensors (no model built)."""
    from safetensors import safe_open

    pattern = re.compile(r"\.(\d+)\.(ln_1|ln_2|input_layernorm|post_attention_layernorm)\.weight$")
    out: dict[str, dict[int, float]] = {}
    for f in artifact.weight_files:
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                m = pattern.search(key)
                if m:
                    out.setdefault(m.group(2), {})[int(m.group(1))] = fh.get_tensor(key).float().abs().mean().item() / scale
    return {name: [v[i] for i in sorted(v)] for name, v in out.items()}


def ln_free_card(artifact, model, compatible: bool = False) -> tuple[str, dict, bytes]:
    c = artifact.config
    scales = _norm_scales(artifact, COMPAT_SCALE if compatible else 1.0)
    fig, ax = figure()
    for name, values in sorted(scales.items()):
        ax.plot(range(len(values)), values, marker=".", label=name)
    ax.set_xlabel("decoder layer"), ax.set_ylabel("mean |γ| / σ_avg"), ax.legend(fontsize=8)
    ax.set_title("Folded norm scales (1/σ_avg times the learned gain)")
    names = sorted(scales)
    layers = max((len(v) for v in scales.values()), default=0)
    table = ["| layer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    table += [f"| {i} | " + " | ".join(f"{scales[n][i]:.4g}" if i < len(scales[n]) else "—" for n in names) + " |"
              for i in range(layers)]
    keys = ("model_type", "n_layer", "num_hidden_layers", "n_embd", "hidden_size", "layer_norm_epsilon", "rms_norm_eps")
    settings = {k: c[k] for k in keys if k in c}
    if compatible:
        form = ("a **plain GPT-2 checkpoint** (the released LN-free models' trick: each norm's gain is multiplied by "
                f"{COMPAT_SCALE:g}/σ_avg and its epsilon set to {c.get('layer_norm_epsilon'):g}, so the norm divides by "
                "an almost constant number). Any transformers install loads it; no plugin is needed.")
        install, caveat = "pip install transformers", (
            "**Numerical caveat.** The scaled gains exceed fp16's range (max 65504): load in fp32 or bf16, never fp16. "
            "The norms still compute a (negligible) variance, so direct logit attribution is only approximately exact; "
            "the structurally LN-free export is exact.")
    else:
        form = ("a **structurally LN-free** model: every norm is an affine map (mean-centring for GPT-2) with the constant "
                "1/σ_avg folded into its weight, so direct logit attribution is exact. The architecture "
                f"`{c.get('model_type')}` is registered by hf-compress.")
        install, caveat = "pip install hf-compress", "Without hf-compress installed, transformers does not know this model type."
    return "ln_free", {"paper": PAPER, "form_description": form, "install": install, "caveat": caveat,
            "settings_rows": settings_rows(settings), "plan_table": "\n".join(table),
            "tags": ["layernorm-free", "interpretability"]}, png(fig)
