"""Inference speed of packed SmolLM2-135M against dense fp32 and bf16, measured side by side in one process.

    python benchmarks/inference_speed.py [--repeats 5] [--new-tokens 64] [--prefill 512]

1. Builds the packed checkpoints once (cached under ``$HF_COMPRESS_CACHE/bench-inference``; reruns reuse
   them): GPTQ 4/3/2-bit g64, GPTQ 4-bit with the tied head packed too (``head_bits=4``), and a BAQ mixed plan
   (2–4 bits per column, 3 on average), all with ``dense_dtype="bfloat16"`` so what stays dense runs in bf16.
2. Loads every row the way a user does (``AutoModelForCausalLM.from_pretrained(dir)``) into one process and
   times them interleaved, ``--repeats`` times: decode tokens/s (greedy ``generate``, batch 1, ``--new-tokens``
   after a short prompt) and prefill tokens/s (one forward over ``--prefill`` tokens). Medians and spread.
3. Peak RSS of each row in its own fresh process (load + one prefill + one decode), and the model's bytes.

Writes the table and ``benchmarks/inference_speed.png`` into ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _results import write_section

TITLE = "## Inference speed on CPU (packed vs dense)"
HERE = Path(__file__).resolve().parent
PROMPT = "The history of the city of Paris begins"
PACKED = {  # row -> (config class, options)
    "GPTQ 4-bit": ("GPTQConfig", {"bits": 4}),
    "GPTQ 3-bit": ("GPTQConfig", {"bits": 3}),
    "GPTQ 2-bit": ("GPTQConfig", {"bits": 2}),
    "BAQ mixed 2-4 bit (avg 3)": ("BAQConfig", {"target_bits": 3.0, "min_bits": 2, "max_bits": 4}),
    "GPTQ 4-bit + head 4-bit": ("GPTQConfig", {"bits": 4, "head_bits": 4}),
}
DENSE = {"dense fp32": "float32", "dense bf16": "bfloat16"}
# glibc raises its mmap threshold after each large free, so freed multi-MB buffers stay in the heap and peak RSS
# depends on the order of allocations more than on live memory; a fixed threshold shows what the model needs
GLIBC_TUNED = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}

RSS_PROBE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, dtype, prefill, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
kwargs = {"dtype": getattr(torch, dtype)} if dtype != "auto" else {}
model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
ids = torch.randint(100, 10000, (1, prefill))
with torch.no_grad():
    model(ids, use_cache=False)
    model.generate(ids[:, :8], max_new_tokens=new, min_new_tokens=new, do_sample=False)
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(json.dumps({"peak_mb": int(line.split()[1]) / 1024}))
"""


def bench_dir() -> Path:
    from hf_compress.models import cache_dir

    return cache_dir() / "bench-inference"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def build_packed(name: str, calib_samples: int) -> Path:
    """Quantize the fp32 model for one row and save it (skipped when the checkpoint exists)."""
    import hf_compress
    from hf_compress.calibration.data import CalibrationSpec, default_text_source

    out = bench_dir() / slug(name)
    if (out / "config.json").is_file():
        return out
    cls_name, options = PACKED[name]
    model, tok = hf_compress.load_model(None)
    config = getattr(hf_compress, cls_name)(group_size=64, dense_dtype="bfloat16", **options)
    spec = CalibrationSpec(default_text_source("validation"), calib_samples, 256, 0)
    t = time.perf_counter()
    hf_compress.quantize(model, config, calibration=spec, tokenizer=tok)
    print(f"{name}: quantized in {time.perf_counter() - t:.0f} s", flush=True)
    hf_compress.save_pretrained(model, out)
    tok.save_pretrained(out)
    return out


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=16)
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_compress
    from hf_compress.kernels.report import format_kernel_report
    from hf_compress.models import default_model_dir
    from hf_compress.report import size_report

    dense_dir = default_model_dir()
    paths = {name: (dense_dir, dtype) for name, dtype in DENSE.items()}
    for name in PACKED:
        paths[name] = (build_packed(name, args.calib_samples), "auto")
    tok = AutoTokenizer.from_pretrained(dense_dir)
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    long_ids = torch.randint(100, 10000, (1, args.prefill), generator=g)

    models, kernels, sizes = {}, {}, {}
    for name, (path, dtype) in paths.items():
        kwargs = {"dtype": getattr(torch, dtype)} if dtype != "auto" else {}
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        models[name] = model
        sizes[name] = size_report(model).ideal_bytes / 2**20
        packed = any(isinstance(m, hf_compress.PackedLinear) for m in model.modules())
        kernels[name] = format_kernel_report(hf_compress.kernel_report(model)).splitlines()[0] if packed else "dense"

    def decode(model):
        model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def prefill(model):
        model(long_ids, use_cache=False)

    samples = {name: {"decode": [], "prefill": []} for name in models}
    texts = {}
    with torch.no_grad():
        for name, model in models.items():  # warm-up: kernels repacked, allocator primed
            out = model.generate(prompt, max_new_tokens=16, do_sample=False)
            texts[name] = tok.decode(out[0, prompt.shape[1]:])
            prefill(model)
        for r in range(args.repeats):
            for name, model in models.items():
                samples[name]["decode"].append(args.new_tokens / timed(decode, model))
                samples[name]["prefill"].append(args.prefill / timed(prefill, model))
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{n} {samples[n]['decode'][-1]:.1f}" for n in models), flush=True)

    peaks, tuned_peaks = {}, {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for name, (path, dtype) in paths.items():
        for store, extra in ((peaks, {}), (tuned_peaks, GLIBC_TUNED)):
            run = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path), dtype, str(args.prefill),
                                  str(args.new_tokens)], capture_output=True, text=True, env={**env, **extra})
            store[name] = json.loads(run.stdout.strip().splitlines()[-1])["peak_mb"] if run.returncode == 0 else None
            if run.returncode:
                print(run.stderr[-2000:], file=sys.stderr)

    med = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}
    spread = {n: {k: (min(v), max(v)) for k, v in s.items()} for n, s in samples.items()}
    fp32, bf16, q4 = med["dense fp32"], med["dense bf16"], med["GPTQ 4-bit"]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(models)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "decode", f"decode tokens/s (batch 1, {args.new_tokens} new)"),
                           (axes[1], "prefill", f"prefill tokens/s ({args.prefill} tokens)")):
        vals = [med[n][key] for n in names]
        errs = [[med[n][key] - spread[n][key][0] for n in names], [spread[n][key][1] - med[n][key] for n in names]]
        ax.barh(names, vals, xerr=errs, color=["#888", "#bbb"] + ["#3a7"] * (len(names) - 2))
        ax.set_xlabel(label)
        ax.invert_yaxis()
    axes[1].set_yticklabels([])
    fig.suptitle(f"SmolLM2-135M on {os.cpu_count()} CPU cores: median of {args.repeats} interleaved repeats (bars: min-max)")
    fig.tight_layout()
    fig.savefig(HERE / "inference_speed.png", dpi=110)

    lines = [TITLE, "",
             f"Command: `python benchmarks/inference_speed.py --repeats {args.repeats} --new-tokens {args.new_tokens} "
             f"--prefill {args.prefill}` · machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU · "
             f"hf-compress {hf_compress.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
             f"Python {platform.python_version()} · date: {datetime.date.today().isoformat()}", "",
             "SmolLM2-135M-Instruct, every row loaded with `AutoModelForCausalLM.from_pretrained(dir)` into one process "
             f"and timed interleaved, {args.repeats} repeats, median (min–max). Decode: greedy `generate`, batch 1, "
             f"{args.new_tokens} new tokens after a {prompt.shape[1]}-token prompt. Prefill: one forward over "
             f"{args.prefill} tokens. Packed rows: g64, calibration {args.calib_samples} × 256 tokens of WikiText-2 "
             "valid, `dense_dtype=\"bfloat16\"` (norms, embeddings and a dense head in bf16), default kernels "
             "(`HF_COMPRESS_KERNELS=auto`). Peak RSS: each row in a fresh process (load + one prefill + one decode). "
             "With glibc's defaults the peak also counts freed buffers the allocator keeps (its mmap threshold rises "
             "after each large free); the tuned column fixes the threshold at 1 MiB. "
             "MB: the model's tensors as stored (packed codes, scales and zeros, dense parts).", "",
             "| model | decode tok/s | vs fp32 | vs bf16 | prefill tok/s | vs bf16 | peak RSS MB | peak RSS MB, "
             "`MALLOC_MMAP_THRESHOLD_=1048576` | model MB | kernels |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        m, s = med[n], spread[n]
        peak = f"{peaks[n]:.0f}" if peaks[n] is not None else "failed"
        tuned = f"{tuned_peaks[n]:.0f}" if tuned_peaks[n] is not None else "failed"
        lines.append(f"| {n} | {m['decode']:.1f} ({s['decode'][0]:.1f}–{s['decode'][1]:.1f}) | "
                     f"{m['decode'] / fp32['decode']:.2f}× | {m['decode'] / bf16['decode']:.2f}× | "
                     f"{m['prefill']:.0f} ({s['prefill'][0]:.0f}–{s['prefill'][1]:.0f}) | "
                     f"{m['prefill'] / bf16['prefill']:.2f}× | {peak} | {tuned} | {sizes[n]:.0f} | {kernels[n]} |")
    low = [n for n in names if n not in DENSE and n != "GPTQ 4-bit" and "head" not in n]
    goals = [
        ("packed 4-bit decode ≥ 3× fp32", q4["decode"] / fp32["decode"], 3.0),
        ("packed 4-bit decode ≥ 1.5× bf16", q4["decode"] / bf16["decode"], 1.5),
        ("packed 4-bit prefill ≥ bf16", q4["prefill"] / bf16["prefill"], 1.0),
    ] + [(f"{n} decode ≥ 4-bit", med[n]["decode"] / q4["decode"], 1.0) for n in low]
    lines += ["", "Goals (ratios of medians): " + "; ".join(
        f"{label}: {ratio:.2f} ({'met' if ratio >= target else 'not met'})" for label, ratio, target in goals) + ".",
        "Peak RSS, packed 4-bit vs dense bf16: " + (
            f"{peaks['GPTQ 4-bit']:.0f} vs {peaks['dense bf16']:.0f} MB with glibc's defaults, "
            f"{tuned_peaks['GPTQ 4-bit']:.0f} vs {tuned_peaks['dense bf16']:.0f} MB with a fixed mmap threshold"
            if peaks["GPTQ 4-bit"] and peaks["dense bf16"] and tuned_peaks["GPTQ 4-bit"] else "not measured") + ".",
        "", "![inference speed](inference_speed.png)", "",
        "First 16 greedy tokens per row (a sanity check, not a quality measure): " + "; ".join(
            f"{n}: {texts[n]!r}" for n in names)]
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(TITLE, text)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
