"""Perplexity, throughput and peak-memory measurement: one implementation for tests, CLI and benchmarks.

Perplexity follows the standard protocol: join the text, tokenize it once (no special tokens), cut
non-overlapping windows of ``seq_len``, score each with ``labels = input_ids`` and report
``exp(mean token NLL)`` over all scored tokens.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hf_compress.calibration.data import load_text, tokenize_text
from hf_compress.formats.linear import dequantization_cache


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[W, seq_len]`` windows of a 1-D token stream (a short tail is dropped)."""
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model, tokenizer, source, seq_len: int = 512, max_windows: int | None = None, progress: bool = True) -> float:
    """Perplexity of ``model`` on ``source`` (file, list of strings, or datasets spec)."""
    windows = eval_windows(tokenize_text(load_text(source), tokenizer), seq_len, max_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        with dequantization_cache():
            for row in tqdm(windows, desc="Perplexity", unit="window", disable=not progress):
                ids = row.unsqueeze(0).to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                total_nll += float(loss) * (seq_len - 1)
                total_tokens += seq_len - 1
    finally:
        model.train(was_training)
    nll = total_nll / total_tokens
    if not math.isfinite(nll):
        return float("inf")
    return math.exp(nll)


@dataclass
class Throughput:
    tokens_per_second: float
    seconds: float
    tokens: int


@torch.no_grad()
def forward_throughput(model, seq_len: int = 512, batch: int = 1, repeats: int = 3, vocab_size: int | None = None) -> Throughput:
    """Tokens/s of a full forward pass (prefill) on random tokens, best of ``repeats`` after one warm-up."""
    vocab = vocab_size or model.config.vocab_size
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    model(input_ids=ids, use_cache=False)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return Throughput(batch * seq_len / best, best, batch * seq_len)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    """Resident set size now (Linux ``/proc``; falls back to the peak elsewhere)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()
