"""Calibration text → a seeded ``[N, L]`` tensor of token windows.

A source is any of: a ``datasets`` spec (``"name"``, ``"name:config"``, ``"name:config:split"`` or a dict
``{"path", "name", "split", "text_column", "data_files"}``), a local text file, or a list of strings. The text is joined and
tokenized once, and N windows of L tokens start at offsets drawn from ``torch.Generator().manual_seed(seed)``
— the protocol of the benchmark notes, so tests, CLI and benchmarks see the same tokens.

Pre-tokenized sources (own tokenisation, chat templates) need no tokenizer:
- a 2-D integer tensor ``[N, L]`` is used as the windows themselves (``num_samples``/``seq_len`` do not apply);
- a 1-D integer tensor or a list of ints is one token stream, windowed like tokenized text;
- a list of id lists, or a ``datasets.Dataset`` with an ``input_ids`` column, is documents joined into one
  stream (as text documents are), then windowed. (A ``Dataset`` with only a ``text`` column is text.)
"""

from __future__ import annotations

import os
import re
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


def _is_dataset(source) -> bool:
    return hasattr(source, "column_names") and hasattr(source, "__getitem__") and not isinstance(source, dict)


def is_pretokenized(source) -> bool:
    """Whether ``source`` holds token ids already (so no tokenizer is needed)."""
    if isinstance(source, CalibrationSpec):
        source = source.source
    if isinstance(source, torch.Tensor):
        return True
    if _is_dataset(source):
        return "input_ids" in source.column_names
    if isinstance(source, (list, tuple)) and source:
        return all(isinstance(x, int) and not isinstance(x, bool) for x in source) or all(
            isinstance(x, (list, tuple, torch.Tensor)) for x in source)
    return False


def _as_ids(values, what: str) -> torch.Tensor:
    ids = values if isinstance(values, torch.Tensor) else torch.tensor(list(values))
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"{what} holds a negative token id ({int(ids.min())})")
    return ids.long()


def pretokenized_windows(source, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Token windows ``[N, L]`` from a pre-tokenized source (see the module docstring)."""
    if isinstance(source, torch.Tensor):
        ids = _as_ids(source, "the calibration tensor")
        if ids.dim() == 2:
            if ids.shape[0] == 0 or ids.shape[1] < 2:
                raise ValueError(f"calibration windows {list(ids.shape)}: need at least one window of >= 2 tokens")
            return ids
        if ids.dim() != 1:
            raise ValueError(f"a calibration tensor must be 1-D (a token stream) or 2-D [N, L], got {list(ids.shape)}")
        return sample_windows(ids, num_samples, seq_len, seed)
    if _is_dataset(source):
        source = source["input_ids"]
    if all(isinstance(x, int) for x in source):
        return sample_windows(_as_ids(source, "the calibration ids"), num_samples, seq_len, seed)
    docs = [_as_ids(x, f"calibration sequence {i}").flatten() for i, x in enumerate(source)]
    return sample_windows(torch.cat(docs) if docs else torch.zeros(0, dtype=torch.long), num_samples, seq_len, seed)


def describe_source(source) -> str:
    """A short JSON-safe description of an in-memory source, for config.json."""
    if isinstance(source, CalibrationSpec):
        return f"{describe_source(source.source)}, {source.num_samples} x {source.seq_len} tokens, seed {source.seed}"
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, torch.Tensor):
        return f"<in-memory token ids {list(source.shape)}>"
    if _is_dataset(source):
        return f"<datasets.Dataset with {len(source)} rows, columns {list(source.column_names)}>"
    if isinstance(source, (list, tuple)):
        kind = "strings" if all(isinstance(x, str) for x in source) else "token ids" if is_pretokenized(source) else "items"
        return f"<{len(source)} in-memory {kind}>"
    return f"<{type(source).__name__}>"


def load_text(source) -> str:
    """Resolve a calibration source to one string (documents joined by blank lines)."""
    if _is_dataset(source):
        if "text" not in source.column_names:
            raise ValueError(f"a calibration Dataset needs an `input_ids` or a `text` column (columns: {source.column_names})")
        source = [t for t in source["text"] if t]
    if isinstance(source, (list, tuple)):
        if not all(isinstance(s, str) for s in source):
            raise TypeError("a calibration list must hold strings")
        text = "\n\n".join(source)
    elif isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        text = Path(source).read_text(encoding="utf-8")
    elif isinstance(source, (str, dict)):
        text = _load_dataset_text(source)
    else:
        raise TypeError(f"unsupported calibration source of type {type(source).__name__}: pass a datasets spec, a "
                        "text file, a list of strings, or token ids (a tensor, a list of id lists, a Dataset with "
                        "`input_ids`)")
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


def tokenize_text(text: str, tokenizer, piece_chars: int = 1 << 16) -> torch.Tensor:
    """The ids of one call ``tokenizer(text, add_special_tokens=False)`` (the perplexity protocol), computed in
    pieces of about ``piece_chars`` characters.

    Why pieces: one call over a long text holds the tokenizer's per-character alignment tables for all of it at once
    (WikiText-2's validation text is 1.1 M characters), a transient that grows with the text and that streamed
    quantization, which bounds everything else, would otherwise pay. The text is cut only at a line start, and only where
    tokenizing a margin around the cut whole and in two parts gives the same ids; a cut that fails the check moves to
    the next line start. A tokenizer that fails it again and again (one that marks the start of every text, say)
    gets the whole text in one call."""
    if len(text) <= 2 * piece_chars:
        return _one_call(tokenizer, text)
    ids: list[int] = []
    start, failed = 0, 0
    while len(text) - start > 2 * piece_chars and failed < _MAX_FAILED_CUTS:
        position, cut = start + piece_chars, None
        while cut is None and failed < _MAX_FAILED_CUTS:
            found = _LINE_START.search(text, position)
            if found is None or found.start() + 1 >= len(text) - _CUT_MARGIN:
                break
            position = found.start() + 1
            if _cut_is_safe(text, tokenizer, position):
                cut = position
            else:
                failed += 1
        if cut is None:
            break
        ids.extend(_ids(tokenizer, text[start:cut]))
        start = cut
    if failed >= _MAX_FAILED_CUTS:
        return _one_call(tokenizer, text)
    ids.extend(_ids(tokenizer, text[start:]))
    return torch.tensor(ids, dtype=torch.long)


_LINE_START = re.compile(r"\n(?= ?\S)")  # a line that starts with text (WikiText indents lines by a space)
_CUT_MARGIN = 512  # characters each side of a cut that are tokenized to check it
_MAX_FAILED_CUTS = 8


def _one_call(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0].to(torch.long)


def _ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).tolist()
    return list(ids[0]) if ids and isinstance(ids[0], (list, tuple)) else list(ids)


def _cut_is_safe(text: str, tokenizer, cut: int) -> bool:
    """Whether cutting at ``cut`` leaves the ids of the text around it unchanged."""
    left, right = text[max(0, cut - _CUT_MARGIN):cut], text[cut:cut + _CUT_MARGIN]
    return _ids(tokenizer, left + right) == _ids(tokenizer, left) + _ids(tokenizer, right)


def sample_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` tokens at seeded random offsets."""
    if ids.numel() < seq_len + 1:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def calibration_batches(spec: CalibrationSpec | object, tokenizer=None) -> torch.Tensor:
    """Token windows ``[N, L]`` for a :class:`CalibrationSpec` (or a bare source with the defaults); the tokenizer
    is only needed for text sources."""
    if not isinstance(spec, CalibrationSpec):
        spec = CalibrationSpec(spec)
    if is_pretokenized(spec.source):
        return pretokenized_windows(spec.source, spec.num_samples, spec.seq_len, spec.seed)
    if tokenizer is None:
        raise ValueError("a text calibration source needs a tokenizer (or pass token ids)")
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
