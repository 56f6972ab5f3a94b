"""Calibration text → a seeded ``[N, L]`` tensor of token windows.

A source is any of: a ``datasets`` spec (``"name"``, ``"name:config"``, ``"name:config:split"`` or a dict
``{"path", "name", "split", "text_column", "data_files"}``), a local text file, or a list of strings. The text is joined and
tokenized once, and N windows of L tokens start at offsets drawn from ``torch.Generator().manual_seed(seed)``
— the protocol of the benchmark notes, so tests, CLI and benchmarks see the same tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class CalibrationSpec:
    """What to calibrate on; serialisable so a config can carry it."""

    source: object  # datasets spec, path, or list of strings
    num_samples: int = 32
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {self.num_samples!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2, got {self.seq_len!r}")


def load_text(source) -> str:
    """Resolve a calibration source to one string (documents joined by blank lines)."""
    if isinstance(source, (list, tuple)):
        if not all(isinstance(s, str) for s in source):
            raise TypeError("a calibration list must hold strings")
        text = "\n\n".join(source)
    elif isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        text = Path(source).read_text(encoding="utf-8")
    elif isinstance(source, (str, dict)):
        text = _load_dataset_text(source)
    else:
        raise TypeError(f"unsupported calibration source of type {type(source).__name__}")
    if not text.strip():
        raise ValueError("calibration set is empty: the source holds no text")
    return text


def _load_dataset_text(spec) -> str:
    import datasets

    if isinstance(spec, str):
        if os.path.sep in spec or spec.endswith((".txt", ".json", ".jsonl")):
            raise FileNotFoundError(f"calibration file not found: {spec}")
        parts = spec.split(":")
        spec = {"path": parts[0], "name": parts[1] if len(parts) > 1 else None, "split": parts[2] if len(parts) > 2 else "train"}
    extra = {"data_files": spec["data_files"]} if spec.get("data_files") else {}
    ds = datasets.load_dataset(spec["path"], spec.get("name"), split=spec.get("split", "train"), **extra)
    column = spec.get("text_column", "text")
    if column not in ds.column_names:
        raise ValueError(f"dataset {spec['path']} has no column {column!r} (columns: {ds.column_names})")
    return "\n\n".join(t for t in ds[column] if t)


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """Tokenize the whole text in one call, without special tokens (the perplexity protocol)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids


def sample_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` tokens at seeded random offsets."""
    if ids.numel() < seq_len + 1:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def calibration_batches(spec: CalibrationSpec | object, tokenizer) -> torch.Tensor:
    """Token windows ``[N, L]`` for a :class:`CalibrationSpec` (or a bare source with the defaults)."""
    if not isinstance(spec, CalibrationSpec):
        spec = CalibrationSpec(spec)
    ids = tokenize_text(load_text(spec.source), tokenizer)
    return sample_windows(ids, spec.num_samples, spec.seq_len, spec.seed)


_WIKITEXT_SPLIT_FILES = {"validation": "valid.txt", "test": "test.txt"}


def local_data_dir(dataset: str = "wikitext-2") -> Path | None:
    """``$HF_COMPRESS_DATA``, else a ``shared/data`` folder beside the working directory or this checkout, that
    holds the folder ``dataset``."""
    env = os.environ.get("HF_COMPRESS_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *Path.cwd().parents[:2], *here.parents[:4]):
        candidates += [base / "shared" / "data"]
    return next((c for c in candidates if (c / dataset).is_dir()), None)


def default_text_source(split: str):
    """WikiText-2 ``split`` ('validation' or 'test'): a local copy when there is one, else the Hub dataset."""
    if split not in _WIKITEXT_SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_WIKITEXT_SPLIT_FILES)}")
    data = local_data_dir()
    if data is not None:
        return str(data / "wikitext-2" / _WIKITEXT_SPLIT_FILES[split])
    return {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": split}
