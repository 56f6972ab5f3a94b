"""Serving export: a compressed model in a format another runtime reads (today: GGUF for llama.cpp/Ollama).

``hf_compress.export(model_or_dir, out_dir, format="gguf")`` writes ``out_dir/<name>.gguf``, a report
(``hf_compress_export.json``: per tensor its type, what was widened and why) and a short model card, atomically
(a failed export leaves no partial folder and the previous export intact).
"""

from __future__ import annotations

import json
from pathlib import Path

FORMATS = ("gguf",)
REPORT = "hf_compress_export.json"


def export(model_or_dir, out_dir, format: str = "gguf", tokenizer=None, widen: bool = False,
           overwrite: bool = False) -> Path:
    """Write ``model_or_dir`` (a model, or a checkpoint folder loaded with transformers) to ``out_dir`` in
    ``format``; returns the written file. Plans the format cannot hold exactly are refused, naming the modules,
    unless ``widen`` (then written in a wider type, the extra bytes reported)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; formats: {', '.join(FORMATS)}")
    from hf_compress.checkpoint.atomic import atomic_directory, check_save_target

    model = model_or_dir
    if isinstance(model_or_dir, (str, Path)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(model_or_dir).is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {model_or_dir}")
        model = AutoModelForCausalLM.from_pretrained(model_or_dir)
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(model_or_dir)
            except (OSError, ValueError):
                tokenizer = None
    out_dir = Path(out_dir)
    overwrite = overwrite or (out_dir / REPORT).is_file()  # our own previous export: replaced
    check_save_target(out_dir, overwrite=overwrite)
    from hf_compress.exporters.gguf import plan_check, write_gguf

    plan_check(model, widen)  # refuse before writing anything
    name = Path(str(getattr(model.config, "_name_or_path", "") or "model")).name or "model"
    with atomic_directory(out_dir, overwrite=True) as staging:
        report = write_gguf(model, Path(staging) / f"{name}.gguf", tokenizer=tokenizer, widen=widen)
        summary = {"format": format, "file": report.path.name, "types": report.types, "widened": report.widened,
                   "widened_extra_bytes": report.widened_extra_bytes, "tokenizer": tokenizer is not None,
                   "file_bytes": report.path.stat().st_size}
        (Path(staging) / REPORT).write_text(json.dumps(summary, indent=2))
        (Path(staging) / "README.md").write_text(_card(summary, model))
    return out_dir / report.path.name


def _card(summary: dict, model) -> str:
    from collections import Counter

    counts = Counter(summary["types"].values())
    plan = getattr(getattr(model.config, "quantization_config", None), "quant_method", None)
    lines = ["---", "library_name: gguf", "tags: [hf-compress, gguf]", "---", "",
             f"# {summary['file']}", "",
             f"GGUF export by hf-compress of a `{plan or 'dense'}` model: "
             + ", ".join(f"{n} × {t}" for t, n in counts.most_common()) + ".",
             "Packed weights carry the solver's codes unchanged (Q4_0 for 1–3-bit and symmetric 4-bit, Q4_1 for "
             "asymmetric 4-bit, Q8_0 for symmetric 8-bit).", ""]
    if summary["widened"]:
        lines += [f"Widened to F16 ({summary['widened_extra_bytes'] / 2**20:.1f} MB more than packed): "
                  + "; ".join(f"`{n}` ({r})" for n, r in summary["widened"].items()), ""]
    lines += ["Checked readers: transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`) and the `gguf` "
              "package's reader, in hf-compress's tests." + ("" if summary["tokenizer"] else
                                                          " No tokenizer was written: llama.cpp needs one."), ""]
    return "\n".join(lines)
