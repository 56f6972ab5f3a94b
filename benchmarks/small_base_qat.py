"""QAT at 2 bits and ternary on the small Llama base (issue 23): GPTQ / RTN / TWN post-training (no training) vs
plain KD-QAT vs Teacher Intervention QAT (TI-G), at equal steps on identical batches.

SmolLM2-135M cannot be trained for the thousands of steps this comparison needs on a 2-core CPU; the char-level
Llama of ``benchmarks/small_base.py`` (8 layers, d 128, 1.6 M parameters, TinyShakespeare) can, so the convergence
claim is measured here. Decoder linears only (q/k/v/o/gate/up/down; the tied embedding stays fp32), group 32
(d = 128 gives 4 groups per row of the 128-wide inputs and 11 of the 352-wide ``down_proj``).

* PTQ rows: ``hf_compress.quantize`` with GPTQConfig (2-bit, calibrated on 64 seeded training windows × 128 chars),
  RTNConfig (2-bit) and TIQATConfig (ternary: TWN's grid after zero training steps — the QAT rows' start).
* QAT rows: ``prepare_qat`` from the fp weights (min-max 2-bit grid / TWN ternary grid; latent weights trained,
  scales fixed), the fp model as teacher (fp32, no grad), ``TeacherIntervention`` with the package's default
  distillation loss (soft CE + hidden-state + attention-map + attention-output MSE, all weight 1, relative MSE),
  trained by ``transformers.Trainer`` with ``TeacherInterventionCallback``. KD-QAT: ``intervention_steps=0``;
  TI-QAT: TI-G (output 1/6, context 1/6, map 4/6) over the paper's 60 steps, then plain KD-QAT.
  ``STEPS`` AdamW steps × 8 × 128 chars, lr 3e-4 (the best of {3e-4, 1e-3, 3e-3} in a 40-step KD-QAT probe),
  10 warmup steps then linear decay to 0 (as TernaryBERT / TI fine-tune BERT; with the lr held constant, a 400-step
  KD-QAT run's training loss rose again after step ~100 as latent weights kept flipping codes), clip 1.0, no weight
  decay. Batch k is ``small_base.batch_at(train, k, 128, 8,
  seed 5)`` in every row (an iterable dataset in step order: identical batches).
* Curves: the training loss of every step (the KD objective; during TI's first 60 steps the student's forward is
  intervened, so those steps are not comparable and are not used for the goal) and the held-out CE (nats/char,
  the plain student, no intervention) every 10 steps on 16 windows; final held-out CE on 64 × 128 chars.
* Export: the trained student's held-out CE again after ``export_packed`` (``PackedLinear``) — it must be equal —
  and the realised bits per weight of the packed modules.

    python benchmarks/small_base_qat.py                 # every missing row (one process each), RESULTS + PNG
    python benchmarks/small_base_qat.py --row ti:2      # one row
    python benchmarks/small_base_qat.py --table-only
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402
from _rows import RowCache, main, measured_on  # noqa: E402

CACHE = RowCache("bench_small_qat", __file__)
TITLE = "## QAT on the small Llama base (Teacher Intervention vs KD-QAT vs PTQ)"
PLOT = Path(__file__).resolve().parent / "small_base_qat.png"
GROUP, BATCH, SEQ, LR, WARMUP, TI_STEPS, SEED = 32, 8, 128, 3e-4, 10, 60, 5
STEPS = int(os.environ.get("HF_COMPRESS_SMALL_QAT_STEPS", "300"))  # smaller only for a smoke run (own cache)
EVAL_EVERY, EVAL_WINDOWS, CALIB_WINDOWS = 10, 16, 64
ROWS = ["fp", "rtn:2", "gptq:2", "twn:ternary", "kd:2", "ti:2", "kd:ternary", "ti:ternary"]
LABELS = {"fp": "full precision (teacher)", "rtn": "RTN (PTQ)", "gptq": "GPTQ (PTQ)",
          "twn": "TWN (PTQ; QAT start)", "kd": "plain KD-QAT", "ti": "TI-QAT (TI-G, 60 steps)"}


def grid(width: str) -> dict:
    return dict(bits=2, sym=True, ternary=True) if width == "ternary" else dict(bits=int(width))


class StepBatches(torch.utils.data.IterableDataset):
    """The examples of batch 0, 1, 2, … in order, so Trainer feeds every row the same batches (``make_batch(step)``
    is a pure function of the step and returns that batch's examples)."""

    def __init__(self, make_batch, steps: int):
        self.make_batch, self.steps = make_batch, steps

    def __iter__(self):
        for step in range(self.steps):
            yield from self.make_batch(step)


def train_qat(teacher, student, ti_steps: int, data, steps: int, batch: int, lr: float, evaluate, eval_every: int,
              ti_config=None, loss=None) -> dict:
    """Train ``student`` (already ``prepare_qat``-ed) against ``teacher`` with Trainer + TeacherInterventionCallback.

    ``data`` yields one training example (a dict of tensors) at a time, in batch order; ``evaluate(student)`` is
    called on the plain student (interventions removed) at step 0 and every ``eval_every`` steps. Returns the
    per-step training curve ``[step, loss, kd_logits]``, the evaluation curve ``[step, value]``, the phase switches
    and the wall time.
    """
    import tempfile

    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_compress.methods.ti_qat import TeacherIntervention, TeacherInterventionCallback, TIConfig

    ti = ti_config or TIConfig(intervention_steps=ti_steps)
    wrapper, callback = TeacherIntervention(student, teacher, ti, loss), TeacherInterventionCallback(ti)
    curve = [[0, evaluate(student)]]

    class Evaluate(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % eval_every == 0 or state.global_step == steps:
                model.close()  # the plain student: no hooks, its own attention (the next batch reinstalls them)
                curve.append([state.global_step, evaluate(model.student)])

    with tempfile.TemporaryDirectory(prefix="hfc-bench-qat-") as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                                 lr_scheduler_type="linear", warmup_steps=WARMUP, weight_decay=0.0,
                                 max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no", seed=0,
                                 use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, log_level="error")
        trainer = Trainer(model=wrapper, args=args, train_dataset=data, callbacks=[callback, Evaluate()])
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    wrapper.close()
    train = [[h["step"], round(h["loss"], 5), h.get("kd_logits")] for h in trainer.state.log_history if "loss" in h]
    return {"train_curve": train, "eval_curve": curve, "phases": callback.history, "schedule": callback.describe(),
            "train_s": round(seconds, 1), "s_per_step": round(seconds / steps, 3)}


def run_row(row: str) -> dict:
    import copy

    from small_base import batch_at, heldout_ce, load

    import hf_compress
    from hf_compress.calibration.data import CalibrationSpec
    from hf_compress.methods.ti_qat import TIQATConfig, export_packed, prepare_qat

    torch.set_num_threads(1)
    torch.manual_seed(0)
    # packed modules run the torch reference kernels (fp32 dequantize + matmul) unless a row asks for the CPU fast
    # path, whose bf16 compute is not the fake-quant numerics
    os.environ["HF_COMPRESS_KERNELS"] = "reference"
    kind, _, width = row.partition(":")
    teacher, tok, train, held, info = load("llama")
    out = {"row": row, "kind": kind, "width": width, "group_size": GROUP, "base_heldout": info["heldout_final"]}
    if kind == "fp":
        return {**out, "heldout": round(heldout_ce(teacher, held, SEQ), 4),
                "heldout_16": round(heldout_ce(teacher, held, SEQ, EVAL_WINDOWS), 4), "bits_per_weight": 32.0, "steps": 0}
    model = copy.deepcopy(teacher)
    if kind in ("rtn", "gptq", "twn"):
        config = {"rtn": hf_compress.RTNConfig, "gptq": hf_compress.GPTQConfig, "twn": TIQATConfig}[kind](
            group_size=GROUP, **grid(width))
        calib = CalibrationSpec(train, num_samples=CALIB_WINDOWS, seq_len=SEQ, seed=0) if kind == "gptq" else None
        start = time.perf_counter()
        hf_compress.quantize(model, config, calibration=calib, progress=False)
        out.update(steps=0, quantize_s=round(time.perf_counter() - start, 1))
    else:
        config = TIQATConfig(group_size=GROUP, **grid(width))
        prepare_qat(model, config)
        data = StepBatches(lambda step: [{"input_ids": w, "attention_mask": torch.ones_like(w)}
                                         for w in batch_at(train, step, SEQ, BATCH, SEED)], STEPS)
        result = train_qat(teacher, model, TI_STEPS if kind == "ti" else 0, data, STEPS, BATCH, LR,
                           lambda m: round(heldout_ce(m, held, SEQ, EVAL_WINDOWS), 4), EVAL_EVERY)
        model.eval()
        fake_ce = heldout_ce(model, held, SEQ)
        probe = held[: 4 * SEQ].view(4, SEQ)
        with torch.no_grad():
            fake_logits = model(probe).logits
        config.training = {"intervention_steps": TI_STEPS if kind == "ti" else 0, "steps": STEPS, "lr": LR}
        export_packed(model, config)
        with torch.no_grad():
            same = bool(torch.equal(model(probe).logits, fake_logits))
        out.update(result, steps=STEPS, heldout_fake_quant=round(fake_ce, 6), packed_logits_equal=same)
    out["heldout"] = round(heldout_ce(model, held, SEQ), 6)  # reference kernels (fp32, what fake quant computes)
    os.environ["HF_COMPRESS_KERNELS"] = "auto"
    out["heldout_cpu_kernel"] = round(heldout_ce(model, held, SEQ), 6)  # the default CPU fast path (bf16 compute)
    report = model.config.quantization_config.report
    out.update(bits_per_weight=report["bits_per_weight"], code_bits=report["code_bits"])
    return out


def running_mean(curve, window: int = 20, start: int = 0):
    """``[(step, mean of the last ``window`` losses)]`` over steps ≥ ``start`` (windows entirely inside)."""
    points = [(s, l) for s, l, *_ in curve if s > start]
    window = max(1, min(window, len(points)))
    return [(points[i][0], sum(l for _, l in points[i - window + 1: i + 1]) / window)
            for i in range(window - 1, len(points))]


def first_reach(curve, target: float):
    return next((s for s, v in curve if v <= target), None)


def goal_lines(results: dict, widths, metric: str, unit: str) -> list[str]:
    """The convergence goal per width: TI's first step at KD's final training loss (20-step running mean, only steps
    after the intervention) and at KD's final held-out ``metric``."""
    lines = []
    for width in widths:
        kd, ti = results.get(f"kd:{width}"), results.get(f"ti:{width}")
        if not (kd and ti):
            lines.append(f"| {width} | not measured | not measured | not measured |")
            continue
        kd_train, ti_train = running_mean(kd["train_curve"]), running_mean(ti["train_curve"], start=ti["schedule"]["intervention_steps"])
        t_train = first_reach(ti_train, kd_train[-1][1]) if ti_train else None
        better = metric != "accuracy"
        kd_eval = kd["eval_curve"][-1][1]
        t_eval = next((s for s, v in ti["eval_curve"] if (v <= kd_eval if better else v >= kd_eval)), None)
        half = kd["steps"] // 2
        holds = t_train is not None and t_train <= half and t_eval is not None and t_eval <= half
        lines.append(f"| {width} | KD final {kd_train[-1][1]:.4f}; TI first at step {t_train if t_train else 'never'} "
                     f"| KD final {kd_eval}{' ' + unit if unit else ''}; TI first at step {t_eval if t_eval is not None else 'never'} | "
                     f"{'holds' if holds else 'does not hold'} (half = step {half}) |")
    return lines


def flatness(results: dict) -> str:
    """How much each QAT row's held-out curve still moved over its second half (mean of the evaluations)."""
    parts = []
    for row, r in results.items():
        if r.get("eval_curve"):
            steps = r["steps"]
            first = [v for s, v in r["eval_curve"] if steps / 2 - steps / 6 <= s <= steps / 2]
            last = [v for s, v in r["eval_curve"] if s >= steps - steps / 6]
            parts.append(f"`{row}` {sum(first) / len(first):.4f} → {sum(last) / len(last):.4f}")
    return ("Held-out curve, mean over the evaluations just before the middle vs over the last sixth of the steps: "
            + "; ".join(parts) + "." if parts else "")


def command_line(script: str, results: dict) -> str:
    """The section's command, machine, versions and date line (shared with ``qat_minilm.py``)."""
    import transformers

    return (f"Command: `python benchmarks/{script}` · {platform.machine()}, {os.cpu_count()} CPU cores (1 torch thread, "
            f"shared with other benchmarks) · torch {torch.__version__}, transformers {transformers.__version__} · "
            f"{measured_on(results) if results else 'not run'}")


def write_results(results: dict) -> None:
    lines = [TITLE, "", command_line("small_base_qat.py", results), "",
             f"Small char-level Llama base (`benchmarks/small_base.py`: 8 layers, d 128, 1.6 M parameters, TinyShakespeare), "
             f"decoder linears quantized, group {GROUP} (asymmetric 2-bit; ternary = TWN on 2-bit symmetric codes). QAT: "
             f"{STEPS} steps × {BATCH} × {SEQ} chars, identical batches in every row, lr {LR} after {WARMUP} "
             f"warmup steps then linear decay to 0, AdamW, clip 1.0; teacher = the fp model; loss = soft CE + hidden + attention-map + "
             f"attention-output MSE (weights 1); TI-G over the first {TI_STEPS} steps. Held-out CE: nats/char on the first "
             f"64 × 128 held-out chars (curves: 16 windows every {EVAL_EVERY} steps). Script docstring has the details.", "",
             "| row | method | width | steps | held-out CE (nats/char) | after `export_packed` (reference kernels) | packed logits == fake-quant | same, default CPU kernel (bf16) | bits/weight (packed modules) | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        kind, _, width = row.partition(":")
        r = results.get(row)
        if r is None:
            lines.append(f"| `{row}` | {LABELS[kind]} | {width or 'fp32'} | — | not measured | | | | | |")
            continue
        packed = (f"{r['heldout']:.4f} (fake-quant {r['heldout_fake_quant']:.4f})" if "heldout_fake_quant" in r
                  else "—")
        equal = {True: "yes", False: "**no**"}.get(r.get("packed_logits_equal"), "—")
        wall = r.get("train_s", r.get("quantize_s", "—"))
        ce = r["heldout"] if kind == "fp" else round(r.get("heldout_fake_quant", r["heldout"]), 4)
        lines.append(f"| `{row}` | {LABELS[kind]} | {width or 'fp32'} | {r['steps']} | {ce} | {packed} | {equal} | "
                     f"{r.get('heldout_cpu_kernel', '—')} | {r['bits_per_weight']} | {wall} |")
    lines += ["", "Goal: TI-QAT reaches plain KD-QAT's final loss in ≤ half the steps.", "",
              "| width | training KD loss (20-step running mean; TI counted only after its intervention) | held-out CE "
              "(16 windows, every 10 steps) | verdict |", "|---|---|---|---|"]
    lines += goal_lines(results, ("2", "ternary"), "ce", "nats/char")
    ptq = results.get("gptq:2")
    if ptq and results.get("kd:2") and results.get("ti:2"):
        lines += ["", f"At equal realised bits ({ptq['bits_per_weight']} bits/weight), 2-bit KD-QAT / TI-QAT reach "
                  f"{results['kd:2']['heldout']:.4f} / {results['ti:2']['heldout']:.4f} nats/char against GPTQ's "
                  f"{ptq['heldout']:.4f} (full precision {results['fp']['heldout']})."]
    lines += ["", "Notes: " + flatness(results) + " TI's training loss over its first "
              f"{TI_STEPS} steps is that of the intervened forward (teacher signals substituted), so the goal uses only "
              "its later steps; its held-out curve is always the plain student's. Wall seconds depend on the machine's "
              "load at the time (shared cores), not on the method."]
    if plot(results, PLOT, LABELS, TI_STEPS, "held-out CE (nats/char)", "small Llama base: QAT at 2 bits and ternary"):
        lines += ["", f"![loss vs step]({PLOT.name})"]
    missing = [r for r in ROWS if r not in results]
    if missing:
        lines += ["", "Not measured: " + ", ".join(f"`{r}`" for r in missing) + " (the run did not reach them before "
                  "the session's deadline; `python benchmarks/small_base_qat.py` runs just the missing rows)."]
    write_section(TITLE, "\n".join(lines) + "\n")


def plot(results: dict, png: Path, labels: dict, ti_steps: int, eval_label: str, title: str) -> bool:
    trained = {r: v for r, v in results.items() if v and v.get("train_curve")}
    if not trained:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"kd": "tab:blue", "ti": "tab:red"}
    for row, r in trained.items():
        style = "-" if r["width"] == "ternary" else "--"
        xs, ys = zip(*running_mean(r["train_curve"], window=10))
        a.plot(xs, ys, style, color=colors[r["kind"]], label=f"{labels[r['kind']]}, {r['width']}")
        xs, ys = zip(*r["eval_curve"])
        b.plot(xs, ys, style, color=colors[r["kind"]], label=f"{labels[r['kind']]}, {r['width']}")
    for r in results.values():  # the full-precision model on the curves' evaluation set
        reference = r.get("heldout_16", r.get("accuracy_curve"))
        if reference is not None:
            b.axhline(reference, color="k", lw=0.8, label="full precision")
    if ti_steps:
        for ax in (a, b):
            ax.axvline(ti_steps, color="grey", lw=0.6, ls=":")
    a.set_xlabel("optimizer step"), a.set_ylabel("training KD loss (10-step running mean)"), a.set_yscale("log")
    b.set_xlabel("optimizer step"), b.set_ylabel(eval_label)
    a.legend(fontsize=8), b.legend(fontsize=8)
    fig.suptitle(title + " (dotted: end of Teacher Intervention)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return True


if __name__ == "__main__":
    main(ROWS, CACHE, run_row, write_results)
