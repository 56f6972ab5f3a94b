"""What kind of hf-compress artifact a checkpoint folder holds, and the card inputs recorded beside it.

Cards and pushes work from a saved folder, not from a live model, so that ``hf-compress card PATH`` and
``hf-compress push PATH`` describe exactly the files that will be uploaded. The kind is read from the folder's
own metadata (``config.json`` / ``adapter_config.json``); nothing is unpickled and no weights are loaded here.

Measured results and the base model's Hub id are not part of any config, so they live in a small sidecar
(``hf_compress_card.json``) that ``record_card_inputs`` writes and the card reads: a card states only what a user
actually measured.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
from pathlib import Path

from hf_compress.checkpoint.artifacts import artifact_kind, read_json

CARD_INPUTS_FILE = "hf_compress_card.json"
# What a push uploads: the checkpoint itself, never Trainer state (optimizer.pt, training_args.bin, checkpoint-*/, runs/)
UPLOADED = ("*.safetensors", "*.gguf", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")
NOT_UPLOADED = ("trainer_state.json", "README.md")


def upload_files(folder: str | os.PathLike) -> list[Path]:
    """The files of ``folder`` a push uploads: weights, configs, tokenizer files, the card sidecar, and the same
    from subfolders that are artifacts themselves (an adapter saved beside its base). Trainer state and logs
    stay behind."""
    folder = Path(folder)
    roots = [folder] + [d for d in sorted(folder.iterdir()) if d.is_dir() and artifact_kind(d)]  # e.g. an adapter saved beside its base
    return [p for root in roots for p in sorted(root.iterdir())
            if p.is_file() and p.name not in NOT_UPLOADED and any(fnmatch.fnmatch(p.name, g) for g in UPLOADED)]


def weights_fingerprint(folder: str | os.PathLike) -> str:
    """Hash of the weight files' names, sizes and safetensors headers: changes whenever other weights are saved."""
    digest = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            digest.update(f.name.encode() + str(f.stat().st_size).encode() + fh.read(min(length, 1 << 24)))
    return digest.hexdigest()


def perplexity_result(value: float, dataset: str = "wikitext", dataset_name: str = "WikiText-2 (raw)",
                      dataset_config: str = "wikitext-2-raw-v1", split: str = "test", protocol: str | None = None) -> dict:
    """One measured perplexity in the form the card turns into ``model-index`` metadata."""
    return {"metric": "perplexity", "value": float(value), "dataset": dataset, "dataset_name": dataset_name,
            "dataset_config": dataset_config, "split": split, "protocol": protocol}


def _check_result(result: dict) -> dict:
    if not isinstance(result, dict) or "metric" not in result or "value" not in result:
        raise ValueError(f"a result needs at least 'metric' and 'value', got {result!r}")
    value = result["value"]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"result {result['metric']!r} has a non-finite or non-numeric value {value!r}")
    return {"dataset": "unknown", "dataset_name": None, "dataset_config": None, "split": None, "protocol": None, **result}


def read_card_inputs(folder: str | os.PathLike) -> dict:
    """``{"base_model": str | None, "results": [...]}`` recorded for ``folder`` (empty when none).

    Results recorded for other weights (the folder was saved over since) are dropped: a card never shows a
    number that was not measured on the weights it describes."""
    path = Path(folder) / CARD_INPUTS_FILE
    data = read_json(path) if path.is_file() else {}
    results = [_check_result(r) for r in data.get("results", [])]
    if results and data.get("weights") != weights_fingerprint(folder):
        results = []
    return {"base_model": data.get("base_model"), "results": results}


def record_card_inputs(folder: str | os.PathLike, base_model: str | None = None, results: list[dict] | None = None) -> Path:
    """Record the base model and measured results for the card of ``folder``.

    A result with the same metric, dataset and split replaces the old one, so re-evaluating updates the card.
    Written to a temporary file and renamed, so an interrupted write leaves the old sidecar intact.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    current = read_card_inputs(folder)
    if base_model is not None:
        current["base_model"] = base_model
    for new in [_check_result(r) for r in results or []]:
        key = (new["metric"], new["dataset"], new["split"])
        current["results"] = [r for r in current["results"] if (r["metric"], r["dataset"], r["split"]) != key] + [new]
    current["weights"] = weights_fingerprint(folder)
    path = folder / CARD_INPUTS_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(current, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
