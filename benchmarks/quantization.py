"""FP32 vs RTN vs GPTQ at 4/3/2 bits, group 64, on SmolLM2-135M-Instruct → benchmarks/RESULTS.md.

Protocol: ../shared/notes/benchmark-protocol.md (WikiText-2 test, first 40 windows of 512 tokens; calibration
32 × 512 tokens of WikiText-2 valid at offsets seeded with 0; decoder Linears only; group 64 because the model's
weights already sit on a 4-bit group-32 grid). Each row runs in its own process so its peak RSS is its own.

    python benchmarks/quantization.py            # all rows, then rewrites the section in RESULTS.md
    python benchmarks/quantization.py --row gptq:3   # one row, JSON on stdout
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import write_section

ROWS = ["fp32", "rtn:4", "gptq:4", "rtn:3", "gptq:3", "rtn:2", "gptq:2", "memory:sequential", "memory:whole"]
GROUP = 64


def _setup():
    import torch

    torch.set_num_threads(2)
    from hf_compress.calibration.data import CalibrationSpec, default_text_source
    from hf_compress.models import load_model

    model, tok = load_model()
    calib = CalibrationSpec(default_text_source("validation"), num_samples=32, seq_len=512, seed=0)
    return model, tok, calib


def run_row(row: str) -> dict:
    import hf_compress
    from hf_compress.evaluation import forward_throughput, peak_rss_bytes, perplexity
    from hf_compress.calibration.data import default_text_source
    from hf_compress.report import checkpoint_bytes, size_report

    model, tok, calib = _setup()
    kind, _, arg = row.partition(":")
    if kind == "memory":
        return memory_row(arg, model, tok, calib)
    out = {"row": row, "method": kind, "bits": int(arg) if arg else 32}
    if kind != "fp32":
        config = (hf_compress.RTNConfig if kind == "rtn" else hf_compress.GPTQConfig)(bits=int(arg), group_size=GROUP)
        t = time.perf_counter()
        hf_compress.quantize(model, config, calibration=calib, tokenizer=tok)
        out["quantize_s"] = round(time.perf_counter() - t, 1)
        out["bits_per_weight"] = round(size_report(model).bits_per_weight, 3)
    else:
        out["quantize_s"], out["bits_per_weight"] = 0.0, 32.0
    out["perplexity"] = round(perplexity(model, tok, default_text_source("test"), 512, 40), 3)
    with tempfile.TemporaryDirectory() as d:
        hf_compress.save_pretrained(model, Path(d) / "ckpt")
        out["checkpoint_bytes"] = checkpoint_bytes(Path(d) / "ckpt")
    out["ideal_bytes"] = size_report(model).ideal_bytes
    out["tokens_per_s"] = round(forward_throughput(model, 512).tokens_per_second, 1)
    out["peak_rss_mb"] = round(peak_rss_bytes() / 2**20)
    return out


def memory_row(mode: str, model, tok, calib) -> dict:
    """Peak RSS of collecting every decoder Linear's Hessian: block by block vs one whole-model pass."""
    import torch

    from hf_compress.calibration.data import calibration_batches
    from hf_compress.calibration.discovery import decoder_layers, is_linear_like
    from hf_compress.calibration.runner import run_sequential
    from hf_compress.evaluation import current_rss_bytes, peak_rss_bytes

    batches = calibration_batches(calib, tok)
    base = current_rss_bytes()
    t = time.perf_counter()
    if mode == "sequential":
        run_sequential(model, batches, lambda n, m: True, lambda n, m, stats: None)
    else:
        prefix, layers = decoder_layers(model)
        hess = {}

        def hook(mod, inp, _out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            hess[mod] = hess.get(mod, 0) + 2 * x.T @ x / x.shape[0]

        handles = [m.register_forward_hook(hook) for m in layers.modules() if is_linear_like(m)]
        with torch.no_grad():
            model(input_ids=batches, use_cache=False)
        for h in handles:
            h.remove()
    return {"row": f"memory:{mode}", "seconds": round(time.perf_counter() - t, 1),
            "model_rss_mb": round(base / 2**20), "peak_rss_mb": round(peak_rss_bytes() / 2**20)}


def versions() -> str:
    import torch
    import transformers

    import hf_compress

    return f"hf-compress {hf_compress.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"


def write_results(results: list[dict]) -> None:
    import os

    q = [r for r in results if not r["row"].startswith("memory")]
    mem = {r["row"].split(":")[1]: r for r in results if r["row"].startswith("memory")}
    lines = [
        "## Quantization: FP32, RTN and GPTQ on SmolLM2-135M-Instruct (group 64)",
        "",
        f"Command: `python benchmarks/quantization.py` · machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU · "
        f"{versions()} · date: {datetime.date.today().isoformat()}",
        "",
        "Protocol: `../shared/notes/benchmark-protocol.md` — WikiText-2 test, first 40 windows × 512 tokens; calibration 32 × 512 "
        "tokens of WikiText-2 valid (seed 0); decoder Linears only; asymmetric grids with integer zero points. GPTQ: damping 0.01, "
        "block 128, act-order with static groups, Hessian-weighted clipping search (20 candidates), true-sequential. "
        "Bits/weight count codes + fp16 scales + packed zero points. Tokens/s: one 512-token forward, best of 3 (dequantize-then-matmul torch path).",
        "",
        "| method | bits | perplexity | bits/weight | quantize time (s) | checkpoint bytes | ideal bytes | forward tokens/s | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in q:
        lines.append(f"| {r['method']} | {r['bits']} | {r['perplexity']} | {r['bits_per_weight']} | {r['quantize_s']} | "
                     f"{r['checkpoint_bytes']:,} | {r['ideal_bytes']:,} | {r['tokens_per_s']} | {r['peak_rss_mb']} |")
    if mem:
        lines += ["", "Calibration statistics (Hessians of all 210 decoder Linears, 32 × 512 tokens), peak RSS of the process:", "",
                  "| runner | peak RSS (MB) | RSS after loading the model (MB) | seconds |", "|---|---|---|---|"]
        for k in ("sequential", "whole"):
            if k in mem:
                label = "block by block (`run_sequential`)" if k == "sequential" else "one whole-model pass, hooks on every Linear"
                lines.append(f"| {label} | {mem[k]['peak_rss_mb']} | {mem[k]['model_rss_mb']} | {mem[k]['seconds']} |")
    write_section(lines[0], "\n".join(lines) + "\n")

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--row", choices=ROWS)
    ap.add_argument("--rows", default=",".join(ROWS))
    args = ap.parse_args()
    if args.row:
        print("RESULT " + json.dumps(run_row(args.row)), flush=True)
        return
    results = []
    for row in args.rows.split(","):
        proc = subprocess.run([sys.executable, __file__, "--row", row], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"row {row} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT "):]))
        print(results[-1], flush=True)
    write_results(results)


if __name__ == "__main__":
    main()
