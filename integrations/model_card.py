"""Model cards for every hf-compress artifact, rendered from the templates in ``model_cards/``.

A card is built from a saved folder (see ``checkpoint.artifacts``): the per-layer plan as a table and a
plot image written beside the card, the method's settings, realised size, the install/load snippet, and measured
results as ``model-index`` metadata. ``huggingface_hub.ModelCard`` does the YAML and template work, so the card
validates exactly as the Hub validates it. Quantized checkpoints share one card (method name and paper from
the registry); every other artifact kind is rendered by the method that declares it (``Method.card``), with the
helpers below.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hf_compress.checkpoint.artifacts import Artifact, inspect_checkpoint
from hf_compress.integrations.card_inputs import read_card_inputs
from hf_compress.integrations.card_templates import template_text
from hf_compress.registry import method_for_artifact, method_for_quant_method, resolve

PLOT_FILE = "hf_compress_plan.png"


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
    if artifact.kind == "export":  # a serving export: its card comes from the export report
        from hf_compress.exporters.card import export_card, read_export_report

        return RenderedCard(export_card(read_export_report(folder), repo_id or artifact.folder.resolve().name,
                                        base_model, results=results, tags=tags))
    recorded = read_card_inputs(folder)
    base_model = base_model or recorded["base_model"] or _base_model_from(artifact)
    results = recorded["results"] + list(results or [])
    repo_id = repo_id or artifact.folder.resolve().name
    template, fields, image = _renderer(artifact)(artifact, model)
    fields["tags"] = [*fields.get("tags", []), *(tags or [])]
    return _assemble(artifact, repo_id, base_model, results, template, fields, image)


def _renderer(artifact: Artifact):
    """Quantized checkpoints share one card; every other kind is rendered by the method that declares it."""
    if artifact.kind == "quantized":  # a method may render its own checkpoints (``Method.card["quantized"]``)
        method = method_for_quant_method(artifact.config["quantization_config"]["quant_method"])
        return resolve(method.card["quantized"]) if method and "quantized" in method.card else _quantized
    method = method_for_artifact(artifact.kind)
    if method is None:
        raise ValueError(f"{artifact.folder} is a {artifact.adapter_config.get('peft_type') or artifact.kind} artifact "
                         "that hf-compress did not make; push it with transformers'/PEFT's push_to_hub")
    return resolve(method.card[artifact.kind])


def _base_model_from(artifact: Artifact) -> str | None:
    """A Hub id recorded by transformers/PEFT, if it is one (local paths are not base models on the Hub)."""
    name = artifact.adapter_config.get("base_model_name_or_path") or artifact.config.get("_name_or_path")
    if name and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not os.path.exists(name):
        return name
    return None


# the Hub's pipeline tag from the architecture's head: a card must not call an image classifier a text generator
PIPELINE_TAGS = {"ForCausalLM": "text-generation", "ForImageClassification": "image-classification",
                 "ForSequenceClassification": "text-classification", "ForMaskedLM": "fill-mask",
                 "ForTokenClassification": "token-classification"}


def _pipeline_tag(artifact: Artifact) -> str:
    for architecture in artifact.config.get("architectures") or []:
        for suffix, tag in PIPELINE_TAGS.items():
            if architecture.endswith(suffix):
                return tag
    return "text-generation"


def _assemble(artifact, repo_id, base_model, results, template, fields, image) -> RenderedCard:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from hf_compress.report import format_bytes

    model_name = repo_id.split("/")[-1]
    evals = [EvalResult(task_type="text-generation", task_name="Causal language modelling",
                        dataset_type=r["dataset"], dataset_name=r["dataset_name"] or r["dataset"],
                        dataset_config=r["dataset_config"], dataset_split=r["split"], metric_type=r["metric"],
                        metric_name=r["metric"] + (f" ({r['protocol']})" if r["protocol"] else ""),
                        metric_value=r["value"]) for r in results]
    is_adapter = bool(artifact.adapter_config)
    data = ModelCardData(
        base_model=base_model, library_name="peft" if is_adapter else "transformers",
        pipeline_tag=fields.pop("pipeline_tag", None) or _pipeline_tag(artifact),
        tags=["hf-compress", artifact.kind.replace("_", "-"), *fields.pop("tags", [])],
        model_name=model_name if evals else None, eval_results=evals or None,
    )
    text = template_text(template)
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


def settings_rows(settings: dict) -> str:
    return "\n".join(f"| {_cell(k)} | {_cell(v)} |" for k, v in settings.items())


def png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def figure(width=9, height=3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _quantized(artifact: Artifact, model) -> tuple[str, dict, bytes]:
    from hf_compress.plan import overall_bits, plan_rows, plan_table, plot_plan
    from hf_compress.report import format_bytes, size_report

    if model is None:
        from transformers import AutoModelForCausalLM

        from hf_compress import register

        register()
        model = AutoModelForCausalLM.from_pretrained(artifact.folder)
    quant = artifact.config["quantization_config"]
    method = method_for_quant_method(quant["quant_method"])
    name, paper = (method.title, method.paper) if method else (quant["quant_method"], None)
    settings = {k: v for k, v in quant.items() if k not in ("plan", "report", "quant_method") and v not in (None, [], {})}
    rows = plan_rows(model)
    code, bits = overall_bits(rows)
    size = size_report(model)
    buf = io.BytesIO()
    plot_plan(model, buf)
    widths = sorted({b for r in rows for b in r["widths"]})
    return "quantized", {"method_name": name, "paper": paper, "settings_rows": settings_rows(settings),
            "plan_table": plan_table(model, per="layer"), "module_table": plan_table(model, per="module"),
            "bits_per_weight": f"{bits:.3f}", "code_bits": f"{code:.3f}",
            "quantized_weights": f"{size.quantized_weights:,}", "dense_params": f"{size.dense_params:,}",
            "fp16_size": format_bytes(size.fp16_bytes), "size_split": size.split(),
            "tags": [quant["quant_method"].removeprefix("hfc_").replace("_", "-"), *[f"{b}-bit" for b in widths]]}, buf.getvalue()
