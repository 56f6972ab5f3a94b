"""Calibration at scale: multi-process speed-up and resume cost, streaming, and a model larger than RAM.

    python benchmarks/scale.py [--part multi] [--blocks 6] [--samples 32] [--repeats 2]
    python benchmarks/scale.py --part streaming [--samples 32]
    python benchmarks/scale.py --part larger-than-ram [--gib 25] [--gptq-blocks 2] [--gptq-samples 4]

``--part streaming`` ("## Streaming quantization"): GPTQ 4-bit g64 on all of SmolLM2-135M-Instruct, in memory
(load, ``quantize``, ``save_pretrained``) and streamed (``quantize_streaming``), each in its own process: peak RSS,
RSS once the libraries are imported, seconds, and whether the two checkpoints hold identical tensors; then RTN
4-bit streamed on random Llama checkpoints of SmolLM2's width at 15/30/60 blocks (peak RSS vs depth).
``--part larger-than-ram`` ("## Larger than RAM"): a random Llama checkpoint (bf16, sharded, written shard by
shard) whose weights exceed the machine's memory; RTN 4-bit streamed end to end, then GPTQ on its first
``--gptq-blocks`` blocks (a config naming fewer layers beside the same shards) with the seconds per block; peak
RSS of each; the synthetic files are deleted afterwards.

GPTQ 4-bit g64 on the first ``--blocks`` blocks of SmolLM2-135M-Instruct, ``--samples`` WikiText-2 windows of 512.
Rows, interleaved, ``--repeats`` times each (median reported): one process using every core; one process with one thread; one process per
core under ``torchrun`` (gloo, one thread each, the windows sharded, Hessians all-reduced); one process with
``resume_dir`` (state written after every block). Each run reports its ``quantize()`` wall time and its peak RSS;
the multi-process row also the share of packed codes that differ from the one-process model (summation order).
Writes "## Calibration at scale". Codes are compared through safetensors files (nothing is pickled).
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

TITLE = "## Calibration at scale"
WORKER = r'''
import json, os, resource, sys, time, torch
import hf_compress
from hf_compress.calibration.data import CalibrationSpec, default_text_source

blocks, samples, out, resume, random_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
distributed = "RANK" in os.environ
if distributed:
    torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
if random_dir == "-":
    model, tok = hf_compress.load_model(None)
    spec = CalibrationSpec(default_text_source("validation"), samples, 512, 0)
else:  # seeded random weights and token windows: the seconds do not depend on the values
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    model, tok = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(random_dir)), None
    ids = torch.randint(0, model.config.vocab_size, (samples, 512), generator=torch.Generator().manual_seed(0))
    spec = CalibrationSpec(ids, samples, 512, 0)
skip = [rf"layers\.({'|'.join(str(i) for i in range(blocks, 64))})\."]
config = hf_compress.GPTQConfig(bits=4, group_size=64, modules_to_not_convert=skip)
t = time.perf_counter()
hf_compress.quantize(model, config, calibration=spec, tokenizer=tok, progress=False,
                     resume_dir=None if resume == "-" else resume)
seconds = time.perf_counter() - t
rank = int(os.environ.get("RANK", 0))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if rank == 0:
    from safetensors.torch import save_file
    codes = {k: v.contiguous() for k, v in model.state_dict().items() if v.dtype == torch.uint8}
    save_file(codes, out + ".codes.safetensors")
    json.dump({"seconds": seconds, "rss_mb": rss}, open(out + ".json", "w"))
if distributed:
    torch.distributed.destroy_process_group()
'''


def run(kind: str, args, tmp: Path, index: int) -> dict:
    script = tmp / "worker.py"
    script.write_text(WORKER)
    out = tmp / f"{kind}_{index}"
    resume = str(tmp / f"state_{index}") if kind == "resumable" else "-"
    cores = os.cpu_count() or 1
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cores)]
                if kind == "multi-process" else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if kind == "one thread" else None
    done = subprocess.run([*launcher, str(script), str(args.blocks), str(args.samples), str(out), resume,
                           args.random_weights or "-"],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return {**json.loads(Path(str(out) + ".json").read_text()), "codes": str(out) + ".codes.safetensors"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("multi", "streaming", "larger-than-ram", "import-floor"), default="multi")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gib", type=float, default=25.0, help="size of the synthetic checkpoint (bf16 weights)")
    parser.add_argument("--gptq-blocks", type=int, default=2)
    parser.add_argument("--gptq-samples", type=int, default=4)
    parser.add_argument("--workdir", default=None, help="where the synthetic checkpoints go (default: a temp folder)")
    parser.add_argument("--random-weights", default=None, metavar="CONFIG_DIR",
                        help="--part multi: seeded random weights from a config folder and random token windows "
                             "(for a machine the model file cannot reach; the seconds do not depend on the values)")
    parser.add_argument("--fresh", action="store_true", help="--part streaming: measure the in-memory row again")
    parser.add_argument("--rows", nargs="+", choices=("rtn", "gptq"), default=("rtn", "gptq"),
                        help="--part larger-than-ram: the runs to measure; with one of them the row is printed and "
                             "the section is left as it is")
    args = parser.parse_args()
    if args.part != "multi":
        from scale_streaming import import_floor, larger_than_ram, streaming

        parts = {"streaming": streaming, "larger-than-ram": larger_than_ram, "import-floor": import_floor}
        return parts[args.part](args)
    import torch
    import transformers

    import hf_compress

    kinds = ("one process", "one thread", "multi-process", "resumable")
    tmp = Path(tempfile.mkdtemp(prefix="hfc-scale-"))
    runs = {k: [] for k in kinds}
    for i in range(args.repeats):
        for kind in kinds:
            runs[kind].append(run(kind, args, tmp, i))
            print(kind, runs[kind][-1], flush=True)
    from safetensors.torch import load_file

    reference = load_file(runs["one process"][0]["codes"])
    cores = os.cpu_count()
    lines = [TITLE, "", f"Command: `python benchmarks/scale.py --blocks {args.blocks} --samples {args.samples} --repeats "
             f"{args.repeats}{' --random-weights DIR' if args.random_weights else ''}` · machine: {platform.machine()}, "
             f"{cores} CPU cores{' (the GPU is not used)' if args.random_weights else ', no GPU'} · hf-compress "
             f"{hf_compress.__version__}, torch {torch.__version__}, transformers {transformers.__version__} · date: "
             f"{datetime.date.today().isoformat()}", "",
             f"GPTQ 4-bit g64 on blocks 0–{args.blocks - 1} of SmolLM2-135M-Instruct (fp32"
             f"{'; seeded random weights in its shapes, random token windows' if args.random_weights else ', WikiText-2 windows'}), "
             f"{args.samples} windows of 512; `quantize()` wall time, median of {args.repeats} interleaved runs; peak RSS of the (rank-0) "
             "process; codes differing from the one-process model.", "",
             "| run | seconds | speed-up | peak RSS MB | codes differing |", "|---|---|---|---|---|"]
    base = statistics.median(r["seconds"] for r in runs["one process"])
    labels = {"one process": f"one process, {cores} threads", "multi-process": f"torchrun, {cores} processes × 1 thread (gloo)",
              "resumable": f"one process, `resume_dir` (state after every block)",
              "one thread": "one process, 1 thread"}
    for kind in kinds:
        secs = statistics.median(r["seconds"] for r in runs[kind])
        rss = max(r["rss_mb"] for r in runs[kind])
        codes = load_file(runs[kind][0]["codes"])
        differing = sum(int((codes[k] != reference[k]).sum()) for k in reference)
        total = sum(v.numel() for v in reference.values())
        lines.append(f"| {labels[kind]} | {secs:.1f} | {base / secs:.2f}× | {rss:.0f} | {differing} of {total} bytes |")
    lines += ["", "Codes differing: GPTQ's error feedback turns float summation-order differences (threads, processes) into "
              "different rounding choices; the one-thread row is the same single process with another summation order, "
              "so it shows how much of the multi-process difference is that alone.", "",
              "Streaming and the larger-than-RAM run: their own sections (`--part streaming`, `--part larger-than-ram`)."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(TITLE, text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
