"""Peak memory of quantizing SmolLM2-135M, before and after the calibration runner drops finished blocks' dense copies.

Each row runs in a fresh interpreter: load the fp32 model, reset the peak-RSS counter (``/proc/self/clear_refs``),
quantize, read the peak (``VmHWM``). "before" runs the package from a git worktree of ``--before`` (the commit
before the fix), "after" this checkout; rows are interleaved and repeated, medians reported. The goal of the
issue: GPTQ's peak ≤ fp32 weights + one block + calibration activations (above the process's RSS with the model
loaded, which already holds the fp32 weights).

    python benchmarks/calibration_memory.py [--before 18c183b] [--repeats 2]
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
import tempfile
from pathlib import Path

from _results import write_section

TITLE = "## Peak memory while quantizing"
REPO = Path(__file__).resolve().parents[1]
PROBE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import hf_compress
from hf_compress.models import load_model
from hf_compress.calibration.data import CalibrationSpec, default_text_source

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

model, tok = load_model(None)
with torch.no_grad():  # safetensors loads lazily (file-backed pages count in RSS only once read): hold the weights
    for p in model.parameters():  # in memory first, as after any use, so the baseline really contains them
        p.data = p.data.clone()
import gc; gc.collect()
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters()) / 2**20
loaded = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
method, samples, seq_len = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cls = {"gptq": hf_compress.GPTQConfig, "rtn": hf_compress.RTNConfig}[method]
spec = CalibrationSpec(default_text_source("validation"), samples, seq_len, 0)
t = time.perf_counter()
hf_compress.quantize(model, cls(bits=4, group_size=64), calibration=spec, tokenizer=tok, progress=False)
print(json.dumps({"file": hf_compress.__file__, "loaded_mb": loaded, "peak_mb": rss("VmHWM:"), "weights_mb": weights,
                  "block_mb": block, "hidden": model.config.hidden_size, "seconds": time.perf_counter() - t}))
"""


def measure(root: Path, method: str, samples: int, seq_len: int) -> dict:
    from hf_compress.calibration.data import local_data_dir

    data = os.environ.get("HF_COMPRESS_DATA") or str(local_data_dir() or "")  # the worktree lies elsewhere
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root), "HF_COMPRESS_DATA": data}
    run = subprocess.run([sys.executable, "-c", PROBE, str(root), method, str(samples), str(seq_len)], env=env,
                         capture_output=True, text=True, cwd=str(root))
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    row = json.loads(run.stdout.strip().splitlines()[-1])
    if not row["file"].startswith(str(root)):
        raise RuntimeError(f"imported {row['file']}, not the package under {root}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="18c183b", help="commit without the per-block release")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    import torch
    import transformers

    worktree = Path(tempfile.mkdtemp(prefix="hfc-before-"))
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.before], check=True,
                   capture_output=True)
    try:
        rows = {("before", "gptq"): [], ("after", "gptq"): [], ("after", "rtn"): []}
        for _ in range(args.repeats):
            for (version, method), runs in rows.items():
                root = worktree if version == "before" else REPO
                runs.append(measure(root, method, args.num_samples, args.seq_len))
                print(version, method, runs[-1], flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], capture_output=True)
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("loaded_mb", "peak_mb", "seconds")} | v[0]
           for k, v in rows.items()}
    any_row = next(iter(med.values()))
    activations = 3 * args.num_samples * args.seq_len * any_row["hidden"] * 4 / 2**20  # block inputs, outputs, one spare
    budget = any_row["weights_mb"] + any_row["block_mb"] + activations
    lines = [TITLE, "",
             f"Command: `python benchmarks/calibration_memory.py --before {args.before} --repeats {args.repeats}` · "
             f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU · torch {torch.__version__}, "
             f"transformers {transformers.__version__}, Python {platform.python_version()} · date: "
             f"{datetime.date.today().isoformat()}", "",
             f"SmolLM2-135M-Instruct in fp32, 4-bit g64, calibration {args.num_samples} × {args.seq_len} tokens of "
             f"WikiText-2 valid. Each row a fresh process; {args.repeats} interleaved repeats, medians. *Loaded*: RSS "
             "with the fp32 model loaded and its weights materialised (runtime + weights; safetensors would otherwise "
             "map them lazily and the first read of each weight would count as growth); *peak*: highest RSS while quantizing; *above loaded*: "
             "peak − loaded. \"before\" = the package at commit " + args.before + " (dense copies kept for the whole "
             "run), \"after\" = this checkout (each block's copies dropped when the runner moves on).", "",
             f"fp32 weights {any_row['weights_mb']:.0f} MB; one block {any_row['block_mb']:.1f} MB; calibration "
             f"activations ≈ {activations:.0f} MB (3 × N × L × hidden × 4 B). Goal: peak ≤ loaded + one block + "
             f"activations, i.e. above loaded ≤ {any_row['block_mb'] + activations:.0f} MB (the loaded RSS already "
             f"holds the fp32 weights; total budget weights + block + activations = {budget:.0f} MB).", "",
             "| code | method | loaded MB | peak MB | above loaded MB | quantize s |", "|---|---|---|---|---|---|"]
    for (version, method), m in med.items():
        lines.append(f"| {version} | {method.upper()} | {m['loaded_mb']:.0f} | {m['peak_mb']:.0f} | "
                     f"{m['peak_mb'] - m['loaded_mb']:.0f} | {m['seconds']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(TITLE, text)


if __name__ == "__main__":
    main()
