"""The model card of an export folder, rendered through ``huggingface_hub.ModelCard`` from ``model_cards/export.md``.

Written at export time from the export report, and rendered again (with the repo id) when the folder is pushed.
Results recorded for the source checkpoint are shown as such: they were measured on the same weights through
hf-compress, not through the format's reader.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT_FACTS = {
    "compressed-tensors": ("compressed-tensors (pack-quantized)", "vLLM and transformers", "compressed-tensors"),
    "gptq": ("GPTQ", "GPTQModel and transformers' GPTQ loader", "gptq"),
    "gguf": ("GGUF", "llama.cpp and Ollama", "gguf"),
}


def _usage(format: str, repo_id: str, summary: dict) -> str:
    if format == "compressed-tensors":
        return ("```bash\nvllm serve " + repo_id + "\n```\n\n```python\nfrom transformers import AutoModelForCausalLM\n\n"
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")  # needs: pip install compressed-tensors\n```')
    if format == "gptq":
        return ("```python\nfrom transformers import AutoModelForCausalLM\n\n"
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")  # needs: pip install gptqmodel\n```')
    return (f"```bash\nllama-cli -hf {repo_id} -p \"Hello\"\n```\n\n```python\nfrom transformers import AutoModelForCausalLM\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", gguf_file="{summary["file"]}")\n```')


def _written(summary: dict) -> str:
    from collections import Counter

    if summary["format"] == "gguf":
        counts = Counter(summary["types"].values())
        text = "ggml tensor types: " + ", ".join(f"{n} × {t}" for t, n in counts.most_common()) + "."
        if summary["widened"]:
            text += (f"\n\nWidened to F16 (+{summary['extra_bytes'] / 2**20:.2f} MB): "
                     + "; ".join(f"`{n}` ({r})" for n, r in summary["widened"].items()))
        return text
    written = summary["written"]
    lines = ["| status | modules |", "|---|---|"] + [f"| {s} | {n} |" for s, n in sorted(written["counts"].items())]
    if "config_groups" in summary:
        lines += ["", "| config group | scheme | modules |", "|---|---|---|"]
        lines += [f"| {g} | {v['scheme']} | {v['modules']} |" for g, v in summary["config_groups"].items()]
    if "dynamic" in summary and summary["dynamic"]:
        lines += ["", f"Per-module overrides (GPTQModel `dynamic`): {len(summary['dynamic'])} pattern(s)."]
    if summary.get("extra_bytes"):
        lines += ["", f"Widening cost {summary['extra_bytes'] / 2**20:.2f} MB over the packed checkpoint."]
    lines += ["", f"Layout: {summary['layout']}."]
    return "\n".join(lines)


def _servability(summary: dict) -> str:
    vllm = summary.get("vllm")
    if not vllm:
        return ""
    kernels = ", ".join(f"{k}: {n}" for k, n in vllm["kernels"].items()) or "none"
    verdict = "servable by vLLM's weight-only kernels" if vllm["servable"] else "**not** servable by vLLM as written"
    return f"**vLLM**: {verdict} (modules per kernel family — {kernels}); fused q/k/v and gate/up share one scheme."


def _results(summary: dict) -> str:
    rows = summary.get("results") or []
    if not rows:
        return "Not measured for this export (pass `results=` to `hf_compress.export`, or see the source checkpoint)."
    lines = ["| metric | value | dataset | split | measured on |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['metric']} | {r['value']:.4g} | {r.get('dataset_name') or r.get('dataset')} | "
                     f"{r.get('split') or '—'} | {r.get('protocol') or 'the source checkpoint (same weights)'} |")
    return "\n".join(lines)


def export_card(summary: dict, repo_id: str | None = None, base_model: str | None = None,
                results: list[dict] | None = None, tags: list[str] | None = None):
    from huggingface_hub import ModelCard, ModelCardData

    from hf_compress.integrations.card_templates import template_text

    fmt = summary["format"]
    name, runtimes, tag = FORMAT_FACTS[fmt]
    repo_id = repo_id or "path/to/export"
    source = summary.get("source", {})
    data = ModelCardData(base_model=base_model, library_name="gguf" if fmt == "gguf" else "transformers",
                         pipeline_tag="text-generation", tags=["hf-compress", "export", tag, *(tags or [])])
    if results:
        summary = {**summary, "results": [*summary.get("results", []), *results]}
    return ModelCard.from_template(
        data, template_str=template_text("export"), model_name=repo_id.split("/")[-1], base_model=base_model,
        source_method=source.get("quant_method", "dense"), source_bpw=source.get("bits_per_weight"), format_name=name,
        runtimes=runtimes, usage=_usage(fmt, repo_id, summary), written=_written(summary),
        servability=_servability(summary), readers="; ".join(summary.get("readers", [])), results=_results(summary))


def write_export_card(folder, summary: dict, repo_id: str | None = None) -> Path:
    card = export_card(summary, repo_id or Path(folder).name)
    card.save(Path(folder) / "README.md")
    return Path(folder) / "README.md"


def read_export_report(folder) -> dict:
    from hf_compress.checkpoint.artifacts import EXPORT_REPORT

    return json.loads((Path(folder) / EXPORT_REPORT).read_text(encoding="utf-8"))
