"""QLoRA-style fine-tuning (LoRA on a 4-bit packed SmolLM2-135M) vs LoRA on the fp32 model: peak RSS and s/step.

LoRA r=8 (alpha 16) on q_proj and v_proj, ``transformers.Trainer``, the same WikiText-2 (valid) batches for every
configuration. The packed base is RTN 4-bit, group 64, saved once with ``hf_compress.save_pretrained`` and loaded
with plain ``AutoModelForCausalLM.from_pretrained`` (as a user would). Each configuration runs in its own fresh
process, so its peak RSS (``ru_maxrss``, model load included) is its own; configurations are interleaved over
several repeats and the medians are reported.

One row is an experiment, not the library: "re-dequantize in backward" patches ``PackedLinear.forward`` in its own
process with an autograd function that dequantizes the weight again in backward instead of letting autograd keep
the dense copy, to measure what that change to ``formats.linear`` would save.

    python benchmarks/qlora.py              # every configuration, then rewrites the "## QLoRA-style" section
    python benchmarks/qlora.py --run NAME   # one configuration (JSON on stdout)
    python benchmarks/qlora.py --table-only # rewrite the section from the last run's results.json
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

TITLE = "## QLoRA-style fine-tuning"
HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
BATCH, SEQ, STEPS, WARMUP, REPEATS, LR = 1, 256, 10, 2, 3, 2e-4
GROUP = 64
CONFIGS = {  # name -> (base, gradient checkpointing, re-dequantize in backward)
    "lora_fp32": ("fp32", False, False),
    "qlora_rtn4": ("packed", False, False),
    "qlora_rtn4_redequant": ("packed", False, True),
    "lora_fp32_gc": ("fp32", True, False),
    "qlora_rtn4_gc": ("packed", True, False),
}
LABELS = {"lora_fp32": "LoRA, fp32 base", "qlora_rtn4": "QLoRA-style, 4-bit packed base",
          "qlora_rtn4_redequant": "QLoRA-style, packed, re-dequantize in backward (experiment)",
          "lora_fp32_gc": "LoRA, fp32 base, gradient checkpointing",
          "qlora_rtn4_gc": "QLoRA-style, packed, gradient checkpointing"}


def packed_dir() -> Path:
    from hf_compress.models import cache_dir

    return cache_dir() / "bench_qlora" / f"smollm2-rtn4-g{GROUP}"


def build_packed_base() -> Path:
    """Quantize the fp32 SmolLM2 once (RTN needs no calibration) and save it where the runs load it from."""
    import hf_compress
    from hf_compress.models import default_model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = packed_dir()
    if (target / "config.json").is_file():
        return target
    src = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(src, dtype="float32")
    hf_compress.quantize(model, hf_compress.RTNConfig(bits=4, group_size=GROUP), progress=False)
    hf_compress.save_pretrained(model, target, tokenizer=AutoTokenizer.from_pretrained(src))
    return target


def patch_redequantize_in_backward() -> None:
    """Experiment: the packed forward keeps no dense weight for backward; backward dequantizes it again."""
    import torch

    from hf_compress.formats.linear import PackedLinear

    plain = PackedLinear.forward

    class Frozen(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, module):
            ctx.module, ctx.dtype = module, x.dtype
            return plain(module, x)

        @staticmethod
        def backward(ctx, grad):  # y = x Wᵀ + b  →  dx = grad · W (the bias is frozen)
            return (grad @ ctx.module.dequantized_weight(grad.dtype)).to(ctx.dtype), None

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad and (self.bias is None or not self.bias.requires_grad):
            return Frozen.apply(x, self)
        return plain(self, x)

    PackedLinear.forward = forward


def run(name: str) -> dict:
    import torch
    from torch.utils.data import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from hf_compress.evaluation import current_rss_bytes, peak_rss_bytes
    from hf_compress.models import default_model_dir

    torch.set_num_threads(int(os.environ.get("HF_COMPRESS_THREADS", "2")))
    base, checkpointing, redequant = CONFIGS[name]
    folder = packed_dir() if base == "packed" else default_model_dir()
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    ids = tok(DATA.read_text()[:100_000], return_tensors="pt").input_ids[0][: STEPS * BATCH * SEQ].view(-1, SEQ)
    rss_before = current_rss_bytes()  # libraries imported, no model yet
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder)
    load_s = time.perf_counter() - t
    model.config.use_cache = False
    if redequant:
        patch_redequantize_in_backward()
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    step_s: list[float] = []

    class Windows(Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_s.append(time.perf_counter() - self.t)

    args = TrainingArguments(str(packed_dir().parent / f"run_{name}"), use_cpu=True, report_to=[], max_steps=STEPS,
                             per_device_train_batch_size=BATCH, learning_rate=LR, lr_scheduler_type="constant",
                             warmup_steps=0, save_strategy="no", logging_strategy="steps", logging_steps=1,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0, train_sampling_strategy="sequential")
    trainer = Trainer(model=model, args=args, train_dataset=Windows(), callbacks=[Clock()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"name": name, "load_s": round(load_s, 2), "rss_before_model_mb": mb(rss_before),
            "peak_rss_mb": mb(peak_rss_bytes()), "step_s": step_s, "s_per_step": statistics.median(step_s[WARMUP:]),
            "mean_loss": statistics.fmean(losses)}


def mb(n: int) -> float:
    return round(n / 2**20, 1)


def child(args: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env, capture_output=True,
                         text=True, cwd=HERE)
    if out.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def versions() -> str:
    import peft
    import torch
    import transformers

    import hf_compress

    return (f"hf-compress {hf_compress.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, Python {platform.python_version()}")


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def fastest(runs: list[dict]) -> float:
    """The least-disturbed repeat's s/step: on a machine shared with other jobs, slowdowns only ever add time."""
    return min(r["s_per_step"] for r in runs)


def table(results: dict[str, list[dict]]) -> list[str]:
    lines = ["| configuration | peak RSS (MB) | peak RSS above the libraries (MB) | s/step, fastest repeat | "
             "s/step, median | mean train loss |", "|---|---|---|---|---|---|"]
    for name, runs in results.items():
        above = statistics.median(r["peak_rss_mb"] - r["rss_before_model_mb"] for r in runs)
        lines.append(f"| {LABELS[name]} | {median(runs, 'peak_rss_mb'):,.0f} | {above:,.0f} | {fastest(runs):.2f} | "
                     f"{median(runs, 's_per_step'):.2f} | {median(runs, 'mean_loss'):.4f} |")
    return lines


def reading_lines(results: dict[str, list[dict]]) -> list[str]:
    """The reading, from the measured numbers (which row is lower is whatever was measured)."""
    peak = {n: median(r, "peak_rss_mb") for n, r in results.items()}
    speed = {n: fastest(r) for n, r in results.items()}
    spread = max(max(r["s_per_step"] for r in runs) / fastest(runs) for runs in results.values())
    change = lambda a, b: f"{peak[b]:,.0f} vs {peak[a]:,.0f} MB ({(peak[b] - peak[a]) / peak[a]:+.0%})"
    return [
        f"Reading: peak RSS, packed vs fp32 base: {change('lora_fp32', 'qlora_rtn4')} without checkpointing, "
        f"{change('lora_fp32_gc', 'qlora_rtn4_gc')} with gradient checkpointing, and "
        f"{change('lora_fp32', 'qlora_rtn4_redequant')} for the re-dequantize experiment. The mechanism: through the "
        "plain packed forward autograd keeps each module's dense dequantized weight until the backward pass (all "
        "blocks' without checkpointing, one block's with it); the experiment keeps none. "
        f"Speed, fastest repeat: packed {speed['qlora_rtn4']:.2f} vs fp32 {speed['lora_fp32']:.2f} s/step "
        f"(the packed forward unpacks every weight each step), {speed['qlora_rtn4_gc']:.2f} vs "
        f"{speed['lora_fp32_gc']:.2f} with checkpointing; the cores were shared with other jobs and a row's repeats "
        f"differed by up to {spread:.1f}×, so the times are rough.",
    ]


def write(results: dict[str, list[dict]], seconds: float, date: str) -> None:
    lines = table(results)
    print("\n".join(lines))
    section = [
        TITLE, "",
        f"Command: `python benchmarks/qlora.py` · machine: {platform.machine()}, {os.cpu_count()} CPU cores shared "
        f"with other jobs, no GPU · {versions()} · date: {date} · total {seconds:.0f} s", "",
        f"SmolLM2-135M-Instruct; LoRA r=8, alpha 16, on q_proj and v_proj (PEFT `get_peft_model`); `transformers.Trainer`, "
        f"AdamW, lr {LR}, {STEPS} steps of {BATCH} × {SEQ} tokens of WikiText-2 valid (the same batches, in order, for "
        f"every row). Packed base: RTN 4-bit, group {GROUP}, embeddings and lm_head (tied) dense fp32, loaded with plain "
        f"`AutoModelForCausalLM.from_pretrained`. Each row in its own process, rows interleaved, {REPEATS} repeats; "
        f"a repeat's s/step is its median over steps {WARMUP + 1}–{STEPS} (the first {WARMUP} are warm-up). Peak RSS "
        "(`ru_maxrss`, median over repeats) includes loading the model; \"above the libraries\" subtracts the "
        "process's RSS just before the model load (torch, transformers, peft and the tokenized text). Mean train "
        f"loss: Trainer's loss over the {STEPS} steps.", "",
        *lines, "",
        *reading_lines(results),
    ]
    write_section(TITLE, "\n".join(section) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", choices=sorted(CONFIGS), help="run one configuration, print JSON")
    parser.add_argument("--build-base", action="store_true", help="quantize and save the packed base, print its path")
    parser.add_argument("--table-only", action="store_true", help="rewrite the section from the last results.json")
    args = parser.parse_args()
    if args.table_only:
        saved = json.loads((packed_dir().parent / "results.json").read_text())
        write(saved["results"], saved["seconds"], saved["date"])
        return
    if args.run:
        print(json.dumps(run(args.run)))
        return
    if args.build_base:
        print(json.dumps(str(build_packed_base())))
        return
    if not DATA.is_file():
        sys.exit(f"WikiText-2 not found at {DATA}")
    start = time.perf_counter()
    base = child(["--build-base"])
    print(f"packed base: {base}", file=sys.stderr, flush=True)
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for repeat in range(REPEATS):
        for name in CONFIGS:  # interleaved, so slow phases of the shared machine hit every configuration
            r = child(["--run", name])
            results[name].append(r)
            print(f"repeat {repeat + 1} {name}: peak {r['peak_rss_mb']:.0f} MB, {r['s_per_step']:.2f} s/step",
                  file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    date = subprocess.run(["date", "+%F"], capture_output=True, text=True).stdout.strip()
    (packed_dir().parent / "results.json").write_text(json.dumps({"results": results, "seconds": seconds, "date": date}))
    write(results, seconds, date)
