"""Model cards for hf-compress checkpoints, rendered from the config's plan and measured results."""

from __future__ import annotations

from importlib import resources

import yaml


def _template() -> str:
    return (resources.files("hf_compress") / "model_cards" / "quantized.md").read_text(encoding="utf-8")


def render_model_card(model, repo_id: str = "path/to/checkpoint", base_model: str | None = None, results: dict | None = None) -> str:
    """Markdown card (with YAML metadata) describing how ``model`` was quantized and what was measured.

    Args:
        model: a model quantized by hf-compress (its config holds the plan).
        repo_id: where the checkpoint will live, used in the loading snippet.
        base_model: the Hub id of the dense model, recorded as ``base_model`` metadata.
        results: measured numbers (e.g. ``{"wikitext-2 perplexity": 27.1}``); omitted ones are not invented.
    """
    from ..report import size_report

    config = model.config.quantization_config
    plan = config.plan or {}
    size = size_report(model)
    settings = {k: v for k, v in config.to_dict().items() if k not in ("plan", "report", "quant_method") and v is not None}
    meta = {"library_name": "transformers", "tags": ["hf-compress", config.quant_method, f"{config.bits}-bit"]}
    if base_model:
        meta["base_model"] = base_model
    fields = {
        "card_data": yaml.safe_dump(meta, sort_keys=False).strip(),
        "model_name": repo_id.split("/")[-1],
        "base_model_line": f"[{base_model}](https://huggingface.co/{base_model}) " if base_model else "This model was ",
        "method": config.quant_method,
        "repo_id": repo_id,
        "settings_rows": "\n".join(f"| {k} | {v} |" for k, v in settings.items()),
        "bits_per_weight": f"{size.bits_per_weight:.3f}",
        "quantized_weights": f"{size.quantized_weights:,}",
        "dense_params": f"{size.dense_params:,}",
        "plan_rows": "\n".join(f"| {n} | {s['bits']} | {s['group_size']} | {s['sym']} |" for n, s in plan.items()),
        "results": "\n".join(f"- {k}: {v}" for k, v in (results or {}).items()) or "Not measured.",
    }
    text = _template()
    for key, value in fields.items():
        text = text.replace("{{ " + key + " }}", str(value))
    return text
