"""Model cards for every hf-compress artifact, rendered from ``hf_compress/model_cards/<kind>.md``.

A card is built from a saved folder (see ``artifacts.inspect_checkpoint``): the per-layer plan as a table and a
plot image written beside the card, the method's settings, realised size, the install/load snippet, and measured
results as ``model-index`` metadata. ``huggingface_hub.ModelCard`` does the YAML and template work, so the card
validates exactly as the Hub validates it.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .artifacts import Artifact, inspect_checkpoint, read_card_inputs

PLOT_FILE = "hf_compress_plan.png"
METHODS = {  # quant_method / kind -> (name, paper)
    "hfc_rtn": ("round-to-nearest (RTN)", None),
    "hfc_gptq": ("GPTQ", "[Frantar et al., 2022](https://arxiv.org/abs/2210.17323)"),
    "hfc_baq": ("BAQ bit allocation", "[arXiv 2506.05664](https://arxiv.org/abs/2506.05664)"),
    "hfc_layerwise": ("Layer-wise Quantization", "[Dumitru et al., arXiv 2406.17415](https://arxiv.org/abs/2406.17415)"),
    "hfc_high_impact": ("high-impact parameter ratios", "Pham et al., layer-wise high-impact parameter ratio optimization"),
    "hfc_rsq": ("RSQ (rotate, scale, then quantize)", "[Sung et al., arXiv 2503.01820](https://arxiv.org/abs/2503.01820)"),
    "recursive": ("Relaxed Recursive Transformers", "[Bae et al., arXiv 2410.20672](https://arxiv.org/abs/2410.20672)"),
    "ln_free": ("LayerNorm removal by fine-tuning", "[Heimersheim, arXiv 2409.13710](https://arxiv.org/abs/2409.13710)"),
}


@dataclass
class RenderedCard:
    """The card and the files it embeds (name -> PNG bytes), ready to write or upload."""

    card: object  # huggingface_hub.ModelCard
    images: dict[str, bytes] = field(default_factory=dict)

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        for name, data in self.images.items():
            (folder / name).write_bytes(data)
        self.card.save(folder / "README.md")
        return folder / "README.md"


def render_card(folder: str | os.PathLike, repo_id: str | None = None, base_model: str | None = None,
                results: list[dict] | None = None, model=None, tags: list[str] | None = None) -> RenderedCard:
    """Card for the checkpoint in ``folder``.

    Args:
        repo_id: where it will live (used in the load snippet); defaults to the folder name.
        base_model: Hub id of the model it was made from; defaults to what ``record_card_inputs`` stored.
        results: measured results (``artifacts.perplexity_result``); added to the recorded ones.
        model: the in-memory model, when the caller has it (saves reloading a quantized checkpoint for its plan).
        tags: extra Hub tags.
    """
    artifact = inspect_checkpoint(folder)
    recorded = read_card_inputs(folder)
    base_model = base_model or recorded["base_model"] or _base_model_from(artifact)
    results = recorded["results"] + list(results or [])
    repo_id = repo_id or artifact.folder.resolve().name
    fields, image = _RENDERERS[artifact.kind](artifact, model)
    fields["tags"] = [*fields.get("tags", []), *(tags or [])]
    return _assemble(artifact, repo_id, base_model, results, fields, image)


def _base_model_from(artifact: Artifact) -> str | None:
    """A Hub id recorded by transformers/PEFT, if it is one (local paths are not base models on the Hub)."""
    name = artifact.adapter_config.get("base_model_name_or_path") or artifact.config.get("_name_or_path")
    if name and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not os.path.exists(name):
        return name
    return None


def _assemble(artifact, repo_id, base_model, results, fields, image) -> RenderedCard:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from ..report import format_bytes

    model_name = repo_id.split("/")[-1]
    evals = [EvalResult(task_type="text-generation", task_name="Causal language modelling",
                        dataset_type=r["dataset"], dataset_name=r["dataset_name"] or r["dataset"],
                        dataset_config=r["dataset_config"], dataset_split=r["split"], metric_type=r["metric"],
                        metric_name=r["metric"] + (f" ({r['protocol']})" if r["protocol"] else ""),
                        metric_value=r["value"]) for r in results]
    is_adapter = artifact.kind in ("relaxed_lora", "adapter")
    data = ModelCardData(
        base_model=base_model, library_name="peft" if is_adapter else "transformers", pipeline_tag="text-generation",
        tags=["hf-compress", artifact.kind.replace("_", "-"), *fields.pop("tags", [])],
        model_name=model_name if evals else None, eval_results=evals or None,
    )
    template = {"ln_free_compatible": "ln_free"}.get(artifact.kind, artifact.kind)
    text = (resources.files("hf_compress") / "model_cards" / f"{template}.md").read_text(encoding="utf-8")
    card = ModelCard.from_template(
        data, template_str=text, model_name=model_name, repo_id=repo_id, base_model=base_model,
        weight_size=format_bytes(artifact.weight_bytes), plot_file=PLOT_FILE, results=_results_text(results), **fields,
    )
    return RenderedCard(card, {PLOT_FILE: image} if image else {})


def _results_text(results: list[dict]) -> str:
    if not results:
        return "Not measured: no evaluation was recorded for this checkpoint (`hf-compress eval PATH --record`)."
    lines = ["| metric | value | dataset | split | protocol |", "|---|---|---|---|---|"]
    lines += [f"| {_cell(r['metric'])} | {r['value']:.4g} | {_cell(r['dataset_name'] or r['dataset'])} | "
              f"{_cell(r['split'] or '—')} | {_cell(r['protocol'] or '—')} |" for r in results]
    return "\n".join(lines)


def _cell(value) -> str:
    """A value as one Markdown table cell: pipes escaped, lists as code spans (regexes stay readable)."""
    if isinstance(value, (list, tuple)):
        text = ", ".join(f"`{v}`" for v in value) or "—"
    elif isinstance(value, dict):
        text = ", ".join(f"{k}: {v}" for k, v in value.items()) or "—"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _settings_rows(settings: dict) -> str:
    return "\n".join(f"| {_cell(k)} | {_cell(v)} |" for k, v in settings.items())


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _figure(width=9, height=3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _quantized(artifact: Artifact, model) -> tuple[dict, bytes]:
    from ..plan import overall_bits, plan_rows, plan_table, plot_plan
    from ..report import format_bytes, size_report

    if model is None:
        from transformers import AutoModelForCausalLM

        from .. import register

        register()
        model = AutoModelForCausalLM.from_pretrained(artifact.folder)
    quant = artifact.config["quantization_config"]
    method, paper = METHODS.get(quant["quant_method"], (quant["quant_method"], None))
    settings = {k: v for k, v in quant.items() if k not in ("plan", "report", "quant_method") and v not in (None, [], {})}
    rows = plan_rows(model)
    code, bits = overall_bits(rows)
    size = size_report(model)
    buf = io.BytesIO()
    plot_plan(model, buf)
    widths = sorted({b for r in rows for b in r["widths"]})
    return {"method_name": method, "paper": paper, "settings_rows": _settings_rows(settings),
            "plan_table": plan_table(model, per="layer"), "module_table": plan_table(model, per="module"),
            "bits_per_weight": f"{bits:.3f}", "code_bits": f"{code:.3f}",
            "quantized_weights": f"{size.quantized_weights:,}", "dense_params": f"{size.dense_params:,}",
            "fp16_size": format_bytes(size.fp16_bytes),
            "tags": [quant["quant_method"].removeprefix("hfc_").replace("_", "-"), *[f"{b}-bit" for b in widths]]}, buf.getvalue()


def _recursive(artifact: Artifact, model) -> tuple[dict, bytes]:
    from ..recursive.sharing import unique_block

    c = artifact.config
    layers, loops, scheme = c["num_hidden_layers"], c.get("num_loops", 2), c.get("recursion_scheme", "cycle")
    blocks = [unique_block(p, layers, loops, scheme) for p in range(layers)]
    per_loop = layers // loops
    table = ["| loop | positions | unique blocks |", "|---|---|---|"]
    table += [f"| {i + 1} | {i * per_loop}–{(i + 1) * per_loop - 1} | {', '.join(map(str, blocks[i * per_loop:(i + 1) * per_loop]))} |"
              for i in range(loops)]
    fig, ax = _figure()
    ax.scatter(range(layers), blocks, c=[p // per_loop for p in range(layers)], cmap="viridis", s=28)
    ax.set_xlabel("unrolled position"), ax.set_ylabel("unique block")
    ax.set_title(f"{layers // loops} unique blocks × {loops} loops ({scheme})")
    settings = {k: c.get(k) for k in ("num_hidden_layers", "num_loops", "recursion_scheme", "recursion_init", "tie_norms",
                                      "early_exit_loss_weight", "early_exit_threshold")}
    params = _stored_params(artifact)
    return {"num_unique": layers // loops, "num_loops": loops, "num_layers": layers, "scheme": scheme,
            "init": c.get("recursion_init"), "paper": METHODS["recursive"][1], "settings_rows": _settings_rows(settings),
            "plan_table": "\n".join(table), "params": f"{params:,}", "tags": ["recursive-transformer"]}, _png(fig)


def _relaxed_lora(artifact: Artifact, model) -> tuple[dict, bytes]:
    a = artifact.adapter_config
    ranks = a.get("rank_pattern") or {m: a.get("r") for m in a.get("target_modules") or []}
    fig, ax = _figure(7, 3.2)
    names = sorted(ranks)
    ax.bar(names, [ranks[n] for n in names], color="tab:blue")
    ax.set_ylabel("LoRA rank (every unrolled position)"), ax.set_title("Relaxed LoRA ranks per module type")
    ax.tick_params(axis="x", labelrotation=30)
    table = ["| module type | rank |", "|---|---|"] + [f"| {n} | {ranks[n]} |" for n in names]
    settings = {k: a.get(k) for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "train_shared_weights")}
    return {"peft_type": a.get("peft_type"), "paper": METHODS["recursive"][1], "settings_rows": _settings_rows(settings),
            "plan_table": "\n".join(table), "tags": ["relaxed-recursive-lora", "lora"]}, _png(fig)


def _adapter(artifact: Artifact, model) -> tuple[dict, bytes]:
    raise ValueError(f"{artifact.folder} is a {artifact.adapter_config.get('peft_type')} adapter that hf-compress did not "
                     "make; push it with PEFT's push_to_hub")


def _norm_scales(artifact: Artifact, scale: float) -> dict[str, list[float]]:
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


def _ln_free(artifact: Artifact, model, compatible: bool = False) -> tuple[dict, bytes]:
    from ..ln_free.export import COMPAT_SCALE

    c = artifact.config
    scales = _norm_scales(artifact, COMPAT_SCALE if compatible else 1.0)
    fig, ax = _figure()
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
    return {"paper": METHODS["ln_free"][1], "form_description": form, "install": install, "caveat": caveat,
            "settings_rows": _settings_rows(settings), "plan_table": "\n".join(table),
            "tags": ["layernorm-free", "interpretability"]}, _png(fig)


def _stored_params(artifact: Artifact) -> int:
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


_RENDERERS = {
    "quantized": _quantized,
    "recursive": _recursive,
    "relaxed_lora": _relaxed_lora,
    "adapter": _adapter,
    "ln_free": _ln_free,
    "ln_free_compatible": lambda a, m: _ln_free(a, m, compatible=True),
}
