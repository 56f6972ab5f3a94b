"""Full fine-tuning vs LoRA (r=8, r=64) vs LISA (γ=2, K=20, with and without state release; through the bare callback
and through the PEFT method, which must give the callback's row) on SmolLM2-135M.

Causal-LM fine-tuning on TinyShakespeare (train: the first 90 % of the text, held-out: the last 10 %), seq 128,
batch 4, the same batches in the same order for every method, constant learning rate, no warmup. Each method
runs in its own process (``transformers.Trainer``), so its peak RSS is its own; results are cached as JSON in
``~/.cache/hf_compress/bench_lisa/`` so an interrupted run resumes.

    python benchmarks/lisa.py                 # every method, then rewrites the "## LISA" section of RESULTS.md
    python benchmarks/lisa.py --method lisa   # one method, JSON on stdout
    python benchmarks/lisa.py --table-only    # rebuild the section and the plot from the cache
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _results import write_section

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
CACHE = Path.home() / ".cache" / "hf_compress" / "bench_lisa"
PLOT = HERE / "smollm2_lisa.png"
METHODS = {  # name -> (kind, settings, learning rate); run in this order ("full" first: it evaluates step 0)
    "full": ("full", {}, 5e-5),
    "lisa": ("lisa", {"release_state": True}, 5e-5),
    "lora_r8": ("lora", {"r": 8}, 5e-4),
    "lisa_keep_state": ("lisa", {"release_state": False}, 5e-5),
    "lora_r64": ("lora", {"r": 64}, 5e-4),
    "lisa_lr5e-4": ("lisa", {"release_state": True}, 5e-4),  # LoRA's learning rate, a one-point check of lr
    "lisa_peft": ("lisa_peft", {"release_state": True}, 5e-5),  # get_peft_model(LisaConfig): must equal "lisa"
}
LABELS = {"full": "full fine-tuning", "lora_r8": "LoRA r=8", "lora_r64": "LoRA r=64",
          "lisa": "LISA γ=2, state released", "lisa_keep_state": "LISA γ=2, state kept",
          "lisa_lr5e-4": "LISA γ=2, state released, lr 5e-4", "lisa_peft": "LISA γ=2, state released, PEFT method"}
SEQ, BATCH, EVAL_WINDOWS, GAMMA = 128, 4, 8, 2


def token_windows(tok, steps: int):
    """Training windows (first 90 %, a fixed seeded sample in a fixed order) and held-out windows (last 10 %)."""
    import torch

    text = DATA.read_text()
    cut = int(len(text) * 0.9)
    train = tok(text[:cut], return_tensors="pt").input_ids[0]
    held = tok(text[cut:], return_tensors="pt").input_ids[0]
    n = train.numel() // SEQ
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: steps * BATCH]
    train_w = train[: n * SEQ].view(n, SEQ)[order]
    return train_w, held[: EVAL_WINDOWS * SEQ].view(EVAL_WINDOWS, SEQ)


def state_bytes(model, optimizer) -> dict:
    """Bytes held now by parameters, gradients and optimizer state."""
    import torch

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt = getattr(optimizer, "optimizer", optimizer)
    states = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return {"params": params, "grads": grads, "optimizer": states}


def run_method(name: str, steps: int, interval: int, eval_every: int) -> dict:
    import torch
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_compress.evaluation import current_rss_bytes, peak_rss_bytes
    from hf_compress.methods.lisa import LisaCallback, LisaConfig
    from hf_compress.models import load_model

    torch.set_num_threads(int(os.environ.get("HF_COMPRESS_THREADS", "2")))
    kind, settings, lr = METHODS[name]
    model, tok = load_model()
    model.config.use_cache = False
    train_w, eval_w = token_windows(tok, steps)
    model_rss = current_rss_bytes()
    callbacks = []
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=settings["r"], lora_alpha=2 * settings["r"], lora_dropout=0.0,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    elif kind == "lisa":
        callbacks.append(LisaCallback(num_active_layers=GAMMA, interval_steps=interval, seed=0, **settings))
    elif kind == "lisa_peft":  # the PEFT method, driven by the argument-free callback
        from peft import get_peft_model

        model = get_peft_model(model, LisaConfig(num_active_layers=GAMMA, interval_steps=interval, seed=0, **settings))
        callbacks.append(LisaCallback())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    @torch.no_grad()
    def held_out_loss(m) -> float:
        was = m.training
        m.eval()
        loss = m(input_ids=eval_w, labels=eval_w).loss.item()  # equal-length windows: mean over all tokens
        m.train(was)
        return loss

    class Windows(Dataset):
        def __len__(self):
            return len(train_w)

        def __getitem__(self, i):
            return {"input_ids": train_w[i], "labels": train_w[i]}

    out = {"method": name, "steps": steps, "interval": interval, "lr": lr, "trainable_at_start": trainable, "curve": [], "step_s": [],
           "peak_bytes": {"params": 0, "grads": 0, "optimizer": 0, "total": 0}, "state_numel": [], "layers": []}

    class Measure(TrainerCallback):
        """Times each optimizer step; records memory after the update (grads still present); evaluates."""

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
            if "trained_per_step" not in out:
                out["trained_per_step"] = sum(p.numel() for p in model.parameters() if p.grad is not None)
            b = state_bytes(model, optimizer)
            b["total"] = sum(b.values())
            if b["total"] > out["peak_bytes"]["total"]:
                out["peak_bytes"] = b
            out["state_numel"].append(b["optimizer"] // 4)

        def on_step_end(self, args, state, control, model=None, **kw):
            out["step_s"].append(time.perf_counter() - self.t)
            if state.global_step % eval_every == 0 or state.global_step == steps:
                out["curve"].append([state.global_step, held_out_loss(model)])
                print(f"{name} step {state.global_step} held-out {out['curve'][-1][1]:.4f} "
                      f"step {out['step_s'][-1]:.1f}s", file=sys.stderr, flush=True)

    if name == "full":  # every method starts from the same function (LoRA's B = 0), so step 0 is evaluated once
        out["curve"].append([0, held_out_loss(model)])
    # Sequential sampler over pre-shuffled windows: every method sees the same batches in the same order.
    args = TrainingArguments(str(CACHE / f"run_{name}"), use_cpu=True, report_to=[], max_steps=steps,
                             per_device_train_batch_size=BATCH, learning_rate=lr, lr_scheduler_type="constant",
                             warmup_steps=0, weight_decay=0.0, save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, seed=0, dataloader_num_workers=0, train_sampling_strategy="sequential")
    trainer = Trainer(model=model, args=args, train_dataset=Windows(), callbacks=[Measure(), *callbacks])
    t = time.perf_counter()
    trainer.train()
    out["train_s"] = round(time.perf_counter() - t, 1)
    if kind.startswith("lisa"):
        out["layers"] = callbacks[0].history
    if kind == "lisa_peft":  # the adapter: the tensors training changed (layers ever sampled + tied embeddings, norm)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            out["adapter_mb"] = round(os.path.getsize(os.path.join(tmp, "adapter_model.safetensors")) / 2**20, 1)
        out["model_mb"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1)
    out["s_per_step"] = round(sum(out["step_s"]) / len(out["step_s"]), 2)
    out["model_rss_mb"] = round(model_rss / 2**20)
    out["peak_rss_mb"] = round(peak_rss_bytes() / 2**20)
    return out


def versions() -> str:
    import peft
    import torch
    import transformers

    import hf_compress

    return (f"hf-compress {hf_compress.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, Python {platform.python_version()}")


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, r in results.items():
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, marker="o", label=LABELS[name], linestyle="--" if name == "lisa_keep_state" else "-")
    ax.set_xlabel("optimizer step (batch 4 × 128 tokens)")
    ax.set_ylabel(f"held-out CE ({EVAL_WINDOWS} × {SEQ} tokens)")
    ax.set_title("SmolLM2-135M on TinyShakespeare")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


def write_results(results: dict, steps: int, interval: int, command: str) -> None:
    mb = lambda b: f"{b / 2**20:,.0f}"
    lines = [
        "## LISA: layer-wise sampled fine-tuning vs LoRA and full fine-tuning on SmolLM2-135M",
        "",
        f"Command: `{command}` · machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with "
        f"other jobs, no GPU · {versions()} · date: {datetime.date.today().isoformat()}",
        "",
        f"Protocol: SmolLM2-135M-Instruct (fp32, tied embeddings) fine-tuned on TinyShakespeare with `transformers.Trainer`: "
        f"train windows from the first 90 % of the text, {steps} optimizer steps of {BATCH} × {SEQ} tokens, the same batches "
        f"in the same order for every method; AdamW, constant learning rate (full and LISA 5e-5, LoRA 5e-4, no tuning; "
        f"one extra LISA row at LoRA's 5e-4), "
        f"no weight decay. Held-out loss: mean CE over {EVAL_WINDOWS} fixed windows × {SEQ} tokens from the last 10 %. "
        f"LoRA on all seven projection Linears, alpha = 2r. LISA: `LisaCallback(num_active_layers={GAMMA}, "
        f"interval_steps={interval}, seed=0)`, embeddings (= tied head) and final norm always trained. "
        "Bytes = parameters + gradients + optimizer state, peak over steps (measured right after each optimizer update, "
        "when the gradients are still held). Peak RSS includes the model load. Seconds/step exclude evaluation; the "
        "machine was shared with other benchmarks, so times are noisy. Step 0 is evaluated once, in the full "
        "fine-tuning process: every method starts from the same function (LoRA's B = 0). "
        + ("" if (steps, interval) == (40, 20) else
           f"Reduced from the planned 40 steps with K = 20 to {steps} steps with K = {interval} (uniformly for every "
           "method) to fit the shared 2-core machine; K was scaled so that LISA still changes layers once."),
        "",
        "| method | params with a gradient (first step) | held-out CE step 0 | " + " | ".join(
            f"step {s}" for s, _ in next(iter(results.values()))["curve"][1:]) +
        " | peak params+grads+optimizer (MB) | of which grads / optimizer (MB) | peak RSS (MB) | s/step |",
        "|---|---|---|" + "---|" * (len(next(iter(results.values()))["curve"]) - 1) + "---|---|---|---|",
    ]
    for name, r in results.items():
        pb = r["peak_bytes"]
        lines.append(f"| {LABELS[name]} | {r['trained_per_step']:,} | " + " | ".join(f"{l:.4f}" for _, l in r["curve"]) +
                     f" | {mb(pb['total'])} | {mb(pb['grads'])} / {mb(pb['optimizer'])} | {r['peak_rss_mb']:,} | {r['s_per_step']} |")
    lisa = [r for n, r in results.items() if n.startswith("lisa")]
    if lisa:
        lines += ["", "Optimizer-state values held after the update at each interval's last step (Adam m and v):", ""]
        for r in lisa:
            ends = [f"step {i + 1}: {n:,}" for i, n in enumerate(r["state_numel"]) if (i + 1) % interval == 0 or i + 1 == r["steps"]]
            lines.append(f"* {LABELS[r['method']]}: " + ", ".join(ends) + " · layers sampled: " +
                         ", ".join(f"steps {s}+ → {l}" for s, l in r["layers"]))
    both = [results.get("lisa"), results.get("lisa_keep_state")]
    if all(both) and both[0]["curve"] == both[1]["curve"]:
        lines += ["", "The two LISA rows at 5e-5 (state released, state kept) follow the same loss curve: no layer of a "
                  "later interval had been sampled before, "
                  "so a kept state would only be reused by layers that no longer train; releasing it changes memory, "
                  "not the updates."]
    if all(k in results for k in ("lisa", "full")) and results["lisa"]["curve"][-1][1] > results["full"]["curve"][-1][1]:
        fast = results.get("lisa_lr5e-4")
        lines += ["", "At full fine-tuning's learning rate (5e-5, untuned) LISA trails full fine-tuning and LoRA: it "
                  "updates 2 of 30 layers (plus embeddings) per interval, so a few dozen steps move it less"
                  + (f"; at LoRA's 5e-4 it reaches {fast['curve'][-1][1]:.4f} at step {fast['curve'][-1][0]} "
                     f"(full fine-tuning {results['full']['curve'][-1][1]:.4f} at 5e-5)" if fast else "")
                  + ". The paper tunes LISA's learning rate and trains for thousands of steps; no wider sweep was run here."]
    same = [results.get("lisa"), results.get("lisa_peft")]
    if all(same):
        equal = same[0]["curve"] == same[1]["curve"] and same[0]["layers"] == same[1]["layers"]
        lines += ["", "The PEFT method (`get_peft_model(model, LisaConfig(...))` trained with `callbacks=[LisaCallback()]`) "
                  + ("gives the bare callback's row exactly (same layers, same held-out losses)" if equal else
                     "DIFFERS from the bare callback's row") + f"; its saved adapter holds {same[1]['adapter_mb']:,} MB "
                  f"of the model's {same[1]['model_mb']:,} MB (full tensors of the layers ever sampled, the tied "
                  "embeddings and the final norm)."]
    lines += ["", f"![held-out loss curves]({PLOT.name})", ""]
    write_section(lines[0], "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=list(METHODS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--interval", type=int, default=20, help="LISA K")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    if args.method:
        print("RESULT " + json.dumps(run_method(args.method, args.steps, args.interval, args.eval_every)), flush=True)
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.methods.split(","):
        path = CACHE / f"{name}_{args.steps}_{args.interval}.json"
        if not path.is_file() and not args.table_only:
            proc = subprocess.run([sys.executable, __file__, "--method", name, "--steps", str(args.steps),
                                   "--interval", str(args.interval), "--eval-every", str(args.eval_every)],
                                  stdout=subprocess.PIPE, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"method {name} failed (exit {proc.returncode})")
            path.write_text(line[len("RESULT "):])
        if path.is_file():
            results[name] = json.loads(path.read_text())
            print(name, {k: v for k, v in results[name].items() if k not in ("step_s", "state_numel")}, flush=True)
    if results:
        if "full" in results:
            step0 = results["full"]["curve"][0]
            for r in results.values():
                if r["curve"][0][0] != 0:
                    r["curve"].insert(0, step0)
        command = "python benchmarks/lisa.py" + "".join(
            f" --{k} {getattr(args, k.replace('-', '_'))}" for k in ("steps", "interval", "eval-every")
            if getattr(args, k.replace("-", "_")) != ap.get_default(k.replace("-", "_")))
        write_results(results, args.steps, args.interval, command)
        plot(results)


if __name__ == "__main__":
    main()
