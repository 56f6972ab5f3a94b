"""Serving export: a compressed model in a format another runtime reads.

``hf_compress.export(model_or_dir, out_dir, format=...)``:

* ``"compressed-tensors"`` — a transformers-style folder vLLM and transformers' compressed-tensors integration load;
  checked against vLLM's weight-only kernels first (``servable=``);
* ``"gptq"`` — a GPTQ folder (``qweight``/``qzeros``/``scales``/``g_idx``, per-module widths in ``dynamic``);
* ``"gguf"`` — one ``.gguf`` file for llama.cpp/Ollama.

Each export folder also holds ``hf_compress_export.json`` (per module what was written, what was widened and why,
the servability report) and a model card, and is written atomically: a failed export leaves no partial folder and
the previous export intact. Plans a format cannot hold exactly are refused before anything is written, naming the
modules, unless widening is asked for (exact rewrites to wider grids, or dense fp16; the size cost is reported).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FORMATS = ("compressed-tensors", "gptq", "gguf")
SERVABLE = ("refuse", "widen", "off")
from hf_compress.checkpoint.artifacts import EXPORT_REPORT as REPORT  # noqa: E402  (one name for the marker)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def export(model_or_dir, out_dir, format: str = "gguf", tokenizer=None, widen: bool = False,
           servable: str = "refuse", dtype: str = "float16", results: list[dict] | None = None,
           overwrite: bool = False) -> Path:
    """Write ``model_or_dir`` (a model, or a checkpoint folder) to ``out_dir`` in ``format``.

    Args:
        widen: write what the format cannot hold exactly in a wider type (exact) or dense, instead of refusing.
        servable: compressed-tensors only — ``"refuse"`` modules vLLM's kernels cannot serve (fused q/k/v and
            gate/up sharing one scheme included), ``"widen"`` them exactly, or ``"off"`` (write for transformers'
            reader only; the vLLM report is still recorded).
        dtype: dense tensors and scales (scales are fp16 in our checkpoints: ``float16``/``float32`` keep them exact).
        results: measured results (``hf_compress.integrations.card_inputs.perplexity_result``) for the card.

    Returns the ``.gguf`` file for GGUF, else the export folder.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; formats: {', '.join(FORMATS)}")
    if servable not in SERVABLE:
        raise ValueError(f"servable must be one of {', '.join(SERVABLE)}, got {servable!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    from hf_compress.checkpoint.atomic import atomic_directory, check_save_target
    from hf_compress.exporters.card import write_export_card

    if dtype == "bfloat16" and format == "compressed-tensors":
        import warnings

        warnings.warn("dtype='bfloat16' rounds the fp16 scales to bfloat16: the exported weights are then close to, "
                      "not equal to, the checkpoint's (float16 keeps them exact)", stacklevel=2)
    model, tokenizer, source_results = _load(model_or_dir, tokenizer)
    out_dir = Path(out_dir)
    overwrite = overwrite or (out_dir / REPORT).is_file()  # our own previous export: replaced
    check_save_target(out_dir, overwrite=overwrite)
    writer = _writer(format)
    plan = writer.plan(model, widen=widen, servable=servable)  # refuses before anything is written
    with atomic_directory(out_dir, overwrite=True) as staging:
        staging = Path(staging)
        summary = writer.write(model, staging, plan, tokenizer=tokenizer, dtype=DTYPES[dtype])
        if tokenizer is not None and format != "gguf":
            tokenizer.save_pretrained(staging)
        summary = {"format": format, "source": source_plan(model), **summary,
                   "results": [*source_results, *(results or [])],
                   "file_bytes": sum(p.stat().st_size for p in staging.iterdir() if p.suffix in (".safetensors", ".gguf"))}
        (staging / REPORT).write_text(json.dumps(summary, indent=2))
        write_export_card(staging, summary, repo_id=out_dir.name)
    return out_dir / summary["file"] if format == "gguf" else out_dir


def _writer(format: str):
    """The format's module: ``plan(model, widen, servable)`` (refuses or decides) and ``write(...)`` (the files)."""
    import importlib

    return importlib.import_module(f"hf_compress.exporters.{format.replace('-', '_')}")


def _load(model_or_dir, tokenizer):
    """The model (loaded with transformers when a folder is given), its tokenizer and the source's recorded results."""
    if not isinstance(model_or_dir, (str, Path)):
        return model_or_dir, tokenizer, []
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress.integrations.card_inputs import read_card_inputs

    if not Path(model_or_dir).is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {model_or_dir}")
    model = AutoModelForCausalLM.from_pretrained(model_or_dir)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_or_dir)
        except (OSError, ValueError):
            tokenizer = None
    try:
        recorded = read_card_inputs(model_or_dir)["results"]
    except (OSError, ValueError):
        recorded = []
    return model, tokenizer, recorded


def source_plan(model) -> dict:
    """What the exported model was: its quantization method and realised bits per weight (our own accounting)."""
    from hf_compress.formats.linear import PackedLinear

    quant = getattr(model.config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    weights = sum(m.in_features * m.out_features for m in packed)
    stored = sum(t.numel() * t.element_size() for m in packed for t in m.buffers() if t is not None)
    return {"quant_method": method or "dense", "model_type": getattr(model.config, "model_type", None),
            "name": str(getattr(model.config, "_name_or_path", "") or ""),
            "packed_modules": len(packed), "bits_per_weight": round(8 * stored / weights, 4) if weights else None}


def linear_module_names(model) -> list[str]:
    """Every linear-like module (dense, packed, a packed embedding table), in model order."""
    from torch import nn

    from hf_compress.formats.linear import PackedLinear

    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, PackedLinear))]


def is_tied(model) -> bool:
    """Whether the output head shares the input embedding table (then only the table is written)."""
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and table is not None and head.weight is getattr(table, "weight", None)


def dense_tensors(model, handled: set[str], dtype) -> dict:
    """Every persistent tensor outside the ``handled`` modules (norms, embeddings, a head), tied copies dropped."""
    out, seen = {}, set()
    for key, tensor in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in handled or any(owner.startswith(h + ".") for h in handled):
            continue
        ptr = (tensor.data_ptr(), tuple(tensor.shape))
        if ptr in seen and tensor.numel():
            continue  # tied (the head sharing the embedding table): readers re-tie it on load
        seen.add(ptr)
        out[key] = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()
    return out
