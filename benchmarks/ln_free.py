"""LayerNorm removal by fine-tuning (Heimersheim 2024; Baroni et al. 2025), scaled to this CPU.

Small GPT-2 (char-level, 4L/4H/128, trained from scratch on TinyShakespeare by
``python -m hf_compress.methods.ln_free.small_gpt2``): the original, a vanilla fine-tune and the LN-free fine-tune (± the
auxiliary residual-norm loss) for the same steps, data and optimiser; held-out loss = mean CE on the last 10% of
TinyShakespeare (every full 128-token window). The LN-free rows also check both exports against the fine-tuned
model and direct logit attribution on the structural export.

SmolLM2-135M-Instruct (RMSNorm removal): original, vanilla and LN-free fine-tunes of a few steps on WikiText-2
valid (batches of 4 × 128), the paper's removal order 5 layers per step with a separate position-0 σ; a run that
reaches a NaN loss stops there and is reported as diverged; perplexity by the protocol (WikiText-2 test, 40 × 512).
Each row runs in its own process; finished rows are cached, so an interrupted run resumes.

    python benchmarks/ln_free.py                   # every missing row, then the table and the loss curve
    python benchmarks/ln_free.py --only gpt2:original gpt2:lnfree
    python benchmarks/ln_free.py --table-only
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402
from _rows import RowCache, main  # noqa: E402
from quantization import versions  # noqa: E402

TITLE = "## LayerNorm-free"
PLOT = Path(__file__).resolve().parent / "ln_free_loss.png"
THREADS = int(os.environ.get("HF_COMPRESS_THREADS", "1"))
# small GPT-2: the methods notes' CPU schedule (ln_2 every 10 from 50, ln_1qk and ln_1v every 15, then ln_f)
GPT2_STEPS, GPT2_BATCH, GPT2_LR = int(os.environ.get("HF_COMPRESS_LNFREE_STEPS", "300")), 8, 5e-4
SMOL_STEPS, SMOL_BATCH, SMOL_SEQ, SMOL_LR = int(os.environ.get("HF_COMPRESS_LNFREE_SMOL_STEPS", "24")), 4, 128, 1e-4
SMOL_WARMUP, SMOL_SCHEDULER = 2, "constant_with_warmup"
# the slow pair: one norm every SLOW_GAP steps (the paper's pace in steps, far fewer tokens) with the auxiliary loss,
# against a vanilla fine-tune of the same steps and windows
SLOW_STEPS, SLOW_BATCH, SLOW_GAP = int(os.environ.get("HF_COMPRESS_LNFREE_SLOW_STEPS", "300")), 2, 3
ROWS = ["gpt2:original", "gpt2:vanilla", "gpt2:lnfree", "gpt2:lnfree_aux",
        "smollm2:original", "smollm2:vanilla", "smollm2:lnfree", "smollm2:vanilla_slow", "smollm2:lnfree_slow"]
AUX_WEIGHT = 0.1


def gpt2_schedule():
    from hf_compress.methods.ln_free import LNRemovalSchedule

    return LNRemovalSchedule(start=50, gap_ln2=10, gap_ln1qk=15, gap_ln1v=15, gap_ln_f=15)


def smol_schedule():
    from hf_compress.methods.ln_free import LNRemovalSchedule

    # the paper's order, gradually: 5 layers per step, one group after the other, then ln_f (all gone at step 21)
    return LNRemovalSchedule(start=2, gap_ln2=1, gap_ln1qk=1, gap_ln1v=1, gap_ln_f=2, layers_per_step=5)


def finetune(model, windows, steps, batch, lr, schedule=None, aux=0.0, warmup=0, scheduler="constant") -> dict:
    """Trainer fine-tune on ``windows`` (same order for every row); LN removal when ``schedule`` is given."""
    from transformers import TrainerCallback, TrainingArguments

    from hf_compress.methods.ln_free import LNFreeTrainer, LNRemovalCallback

    class Losses(TrainerCallback):
        def __init__(self):
            self.values, self.diverged_at = [], None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.values.append(float(logs["loss"]))
                if not math.isfinite(self.values[-1]):  # nothing to learn from NaN weights: stop, report the step
                    self.diverged_at = state.global_step
                    control.should_training_stop = True

    dataset = [{"input_ids": w, "labels": w} for w in windows[: steps * batch]]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                                 lr_scheduler_type=scheduler, warmup_steps=warmup, weight_decay=0.01,
                                 max_grad_norm=1.0, report_to=[], save_strategy="no", logging_steps=1,
                                 logging_nan_inf_filter=False,
                                 use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
        losses = Losses()
        callbacks = [losses]
        removal = None
        if schedule is not None:
            removal = LNRemovalCallback(schedule)
            callbacks.insert(0, removal)
        trainer = LNFreeTrainer(model=model, args=args, train_dataset=dataset, aux_loss_weight=aux,
                                callbacks=callbacks)
        t = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t
    curve = losses.values
    if aux:  # plot the language-model loss only
        curve = [l - aux * a for l, a in zip(curve, trainer.aux_history)]
    model.eval()
    done = len(curve)
    return {"steps": steps, "train_losses": [round(v, 4) if math.isfinite(v) else None for v in curve],
            "s_per_step": round(seconds / max(done, 1), 2), "removed": removal.removed if removal else [],
            "diverged_at": losses.diverged_at}


def _gpt2_data():
    import torch

    from transformers import AutoTokenizer

    from hf_compress.methods.ln_free.small_gpt2 import SmallGPT2Spec, data_path, small_gpt2, split_ids, train_batches

    spec = SmallGPT2Spec()
    path = small_gpt2(spec)
    tok = AutoTokenizer.from_pretrained(path)
    train, held = split_ids(tok, data_path().read_text(encoding="utf-8"))
    windows = torch.cat(list(train_batches(train, spec.block, GPT2_BATCH, GPT2_STEPS, seed=1)))
    return path, spec, windows, held


def export_checks(model, held, block) -> dict:
    """Max |Δ logits| of both exports (reloaded from disk) vs the fine-tuned model; DLA error; export loss."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_compress.methods.ln_free import direct_logit_attribution, export_compatible, export_structural
    from hf_compress.methods.ln_free.small_gpt2 import heldout_loss

    ids = held[: 4 * block].view(4, block)
    out = {}
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        ref = model(input_ids=ids).logits
        for name, export in (("structural", export_structural), ("compatible", export_compatible)):
            loaded = AutoModelForCausalLM.from_pretrained(export(model, Path(d) / name)).eval()
            out[f"{name}_max_delta"] = float((loaded(input_ids=ids).logits - ref).abs().max())
            if name == "structural":
                out["structural_heldout_loss"] = round(heldout_loss(loaded, held, block, max_windows=10**6), 4)
                contributions, logits = direct_logit_attribution(loaded, ids)
                total = sum(contributions.values())
                out["dla_max_error"] = float((total - logits).abs().max())
                out["dla_max_logit"] = float(logits.abs().max())
                # example: the components' share of the logit of the correct next token at the last position
                target = int(held[4 * block])
                out["dla_example"] = {k: round(float(v[-1, -1, target]), 4) for k, v in contributions.items()}
                out["dla_example_logit"] = round(float(logits[-1, -1, target]), 4)
                out["dla_example_sum"] = round(float(total[-1, -1, target]), 4)
    return out


def run_gpt2(kind: str) -> dict:
    from transformers import AutoModelForCausalLM

    from hf_compress.methods.ln_free.small_gpt2 import heldout_loss

    path, spec, windows, held = _gpt2_data()
    model = AutoModelForCausalLM.from_pretrained(path)
    result = {"pretrain": json.loads((path / "training.json").read_text())}
    if kind != "original":
        lnfree = kind.startswith("lnfree")
        result.update(finetune(model, list(windows), GPT2_STEPS, GPT2_BATCH, GPT2_LR,
                               schedule=gpt2_schedule() if lnfree else None,
                               aux=AUX_WEIGHT if kind == "lnfree_aux" else 0.0, warmup=20, scheduler="cosine"))
    result["heldout_loss"] = round(heldout_loss(model, held, spec.block, max_windows=10**6), 4)
    result["heldout_tokens"] = (len(held) // spec.block) * (spec.block - 1)
    if kind.startswith("lnfree"):
        result.update(export_checks(model, held, spec.block))
    return result


def slow_schedule():
    from hf_compress.methods.ln_free import LNRemovalSchedule

    # one layer at a time, SLOW_GAP steps apart, in the paper's order; all 91 norms gone at step 280 of 300
    return LNRemovalSchedule(start=10, gap_ln2=SLOW_GAP, gap_ln1qk=SLOW_GAP, gap_ln1v=SLOW_GAP, gap_ln_f=SLOW_GAP)


def run_smollm2(kind: str) -> dict:
    import torch

    from hf_compress.calibration.data import default_text_source, load_text, tokenize_text
    from hf_compress.evaluation import perplexity
    from hf_compress.models import load_model

    model, tok = load_model()
    result = {}
    if kind != "original":
        ids = tokenize_text(load_text(default_text_source("validation")), tok)
        n = ids.numel() // SMOL_SEQ
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        windows = ids[: n * SMOL_SEQ].view(n, SMOL_SEQ)[order]
        schedule = None
        slow = kind.endswith("_slow")
        steps, batch = (SLOW_STEPS, SLOW_BATCH) if slow else (SMOL_STEPS, SMOL_BATCH)
        if kind.startswith("lnfree"):
            from hf_compress.methods.ln_free import estimate_std, make_removable

            make_removable(model, position0=True)
            estimate_std(model, [windows[:batch]])
            schedule = slow_schedule() if slow else smol_schedule()
        result.update(finetune(model, list(windows), steps, batch, SMOL_LR, schedule=schedule,
                               aux=AUX_WEIGHT if kind == "lnfree_slow" else 0.0,
                               warmup=10 if slow else SMOL_WARMUP, scheduler=SMOL_SCHEDULER))
        if result["diverged_at"] is not None:  # NaN weights: no perplexity to measure
            result["perplexity"] = None
            return result
        if kind.startswith("lnfree"):
            from hf_compress.methods.ln_free import to_structural

            ref_ids = windows[:1]
            with torch.no_grad():
                structural = to_structural(model)
                result["structural_max_delta"] = float(
                    (structural(input_ids=ref_ids).logits - model(input_ids=ref_ids).logits).abs().max())
            del structural
    t = time.perf_counter()
    result["perplexity"] = round(perplexity(model, tok, default_text_source("test"), 512, 40, progress=False), 3)
    result["eval_s"] = round(time.perf_counter() - t, 1)
    return result


def run_row(row: str) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    family, kind = row.split(":")
    result = run_gpt2(kind) if family == "gpt2" else run_smollm2(kind)
    return {"row": row, **result}


class LnFreeRowCache(RowCache):
    """Trained rows are cached per step count, so changing the steps re-measures them."""

    def path(self, row: str) -> Path:
        suffix = f"_{GPT2_STEPS}" if row.startswith("gpt2") else f"_{SLOW_STEPS if row.endswith('_slow') else SMOL_STEPS}"
        return self.dir / f"{row.replace(':', '_')}{'' if row.endswith('original') else suffix}.json"


ROW_CACHE = LnFreeRowCache("bench_ln_free", __file__)


SMOL_DIVERGED = (
    "Analysis: the LN-free run diverged — its training loss rose from 3.60 to {climb} while the 30 "
    "post_attention_layernorms went (0-based steps 2-7) and turned NaN at step {step} (1-based: the first step "
    "without the QK norms of layers 0-4). The forward probes in the section \"LayerNorm-free: SmolLM2 forward probes\" ("
    "`python benchmarks/ln_free_probe.py`, "
    "no training) show why: SmolLM2's position-0 residual is two orders of magnitude larger than the other tokens', "
    "and freezing MLP-input norms at their average σ sends the largest residual to inf within a few layers — with "
    "one σ for all positions, and with the separate position-0 σ too (then driven by other tokens). With a frozen σ, "
    "a token whose residual is k× the average feeds its MLP k× larger inputs; SwiGLU (silu(gate)·up, quadratic for "
    "large inputs) returns roughly k²× larger outputs, and the next layers amplify it again. GPT-2's GELU MLP grows "
    "only linearly, which is consistent with the small GPT-2 surviving several norms a step. The paper removes one "
    "norm every 2-3 steps of 0.5M tokens so the weights can shrink such tokens before the next removal; 5 norms per "
    "512-token step at lr 1e-4 gives no time to adapt, and lr or clipping cannot help once the forward overflows. A "
    "faithful SmolLM2 run needs one norm per several steps on far more tokens — beyond this CPU budget (not "
    "measured); the vanilla fine-tune of the same {steps} steps is the reference it would have to approach.")


GROUP_COLOURS = {"ln_2": "tab:green", "ln_1qk": "tab:orange", "ln_1v": "tab:red", "ln_f": "black", "pos0": "tab:gray"}


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, family in zip(axes, ("gpt2", "smollm2")):
        for kind, colour in (("vanilla", "tab:blue"), ("lnfree", "tab:purple"), ("lnfree_aux", "tab:pink"),
                             ("vanilla_slow", "tab:cyan"), ("lnfree_slow", "tab:olive")):
            r = results.get(f"{family}:{kind}")
            if not r:
                continue
            losses = r["train_losses"]
            # a diverged run stops at its last finite loss (None/NaN are never drawn as a value)
            finite = []
            for v in losses:
                if v is None or not math.isfinite(v):
                    break
                finite.append(v)
            k = 10 if family == "gpt2" or kind.endswith("_slow") else 1
            smooth = [sum(finite[max(0, i - k + 1): i + 1]) / len(finite[max(0, i - k + 1): i + 1])
                      for i in range(len(finite))]
            label = f"{kind} fine-tune"
            diverged = r.get("diverged_at") or (len(finite) + 1 if len(finite) < len(losses) else None)
            if diverged:
                label += f" (diverged: NaN at step {diverged})"
            ax.plot(range(1, len(smooth) + 1), smooth, color=colour, label=label)
            if diverged:
                x, y = (len(smooth), smooth[-1]) if smooth else (diverged, 0.5)
                ax.plot([x], [y], marker="x", ms=10, mew=2, color=colour)
                ax.annotate(f"diverged (NaN) at step {diverged}", (x, y), xytext=(-10, -2), textcoords="offset points",
                            ha="right", va="top", color=colour, fontsize=8)
        marks = results.get(f"{family}:lnfree", {}).get("removed", [])
        seen = set()
        for step, name in marks:
            group = name.split(".")[0]
            ax.axvline(step + 1, color=GROUP_COLOURS[group], lw=0.8, ls=":",
                       label=f"{group} removed" if group not in seen else None)
            seen.add(group)
        title = "small GPT-2 (TinyShakespeare, char)" if family == "gpt2" else "SmolLM2-135M (WikiText-2 valid)"
        ax.set(title=title, xlabel="optimizer step", ylabel="training CE (nats)" + (", 10-step mean" if family == "gpt2" else ""))
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def write_results(results: dict) -> None:
    g = {k.split(":")[1]: v for k, v in results.items() if k.startswith("gpt2")}
    s = {k.split(":")[1]: v for k, v in results.items() if k.startswith("smollm2")}
    pre = next(iter(g.values()), {}).get("pretrain", {}).get("spec", {})
    lines = [
        TITLE, "",
        f"Command: `python benchmarks/ln_free.py` · machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU "
        f"({THREADS} torch thread; other jobs shared the cores, so seconds are upper bounds) · {versions()} · "
        f"{datetime.date.today().isoformat()}",
        "",
        f"**Small GPT-2** (char-level, {pre.get('n_layer')}L/{pre.get('n_head')}H/{pre.get('n_embd')}, block "
        f"{pre.get('block')}, trained from scratch {pre.get('steps')} steps × {pre.get('batch')} windows by "
        "`python -m hf_compress.methods.ln_free.small_gpt2`). Fine-tunes: the same "
        f"{GPT2_STEPS} Trainer steps × {GPT2_BATCH} windows of the train split (seeded), AdamW lr {GPT2_LR} cosine, "
        "warmup 20, wd 0.01, clip 1.0. LN-free schedule: ln_2 every 10 steps from 50, ln_1qk and ln_1v every 15, ln_f "
        f"15 later (all gone at step {gpt2_schedule().last_step(4)}); aux row adds {AUX_WEIGHT} × residual-norm loss at "
        "ln_f's input. Held-out: mean CE (nats/char) over every full 128-char window of the last 10% of TinyShakespeare.",
        "",
        "| row | steps | held-out loss | Δ vs vanilla | structural export: max abs Δlogit (reloaded) / held-out loss | "
        "compatible export max abs Δlogit | DLA max abs error | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("original", "vanilla", "lnfree", "lnfree_aux"):
        r = g.get(kind)
        if not r:
            continue
        delta = f"{r['heldout_loss'] - g['vanilla']['heldout_loss']:+.4f}" if "vanilla" in g and kind != "vanilla" else "—"
        struct = (f"{r['structural_max_delta']:.1e} / {r['structural_heldout_loss']}" if "structural_max_delta" in r else "—")
        compat = f"{r['compatible_max_delta']:.1e}" if "compatible_max_delta" in r else "—"
        dla = f"{r['dla_max_error']:.1e} (max abs logit {r['dla_max_logit']:.1f})" if "dla_max_error" in r else "—"
        lines.append(f"| {kind} | {r.get('steps', 0)} | {r['heldout_loss']} | {delta} | {struct} | {compat} | {dla} | "
                     f"{r.get('s_per_step', '—')} |")
    if "lnfree" in g and "vanilla" in g:
        gap = g["lnfree"]["heldout_loss"] - g["vanilla"]["heldout_loss"]
        lines += ["", f"Acceptance (LN-free within 0.05 nats of vanilla): {gap:+.4f} — "
                      f"{'holds' if gap <= 0.05 else 'does not hold'}."]
    lines += [
        "", f"**SmolLM2-135M-Instruct** (fp32): {SMOL_STEPS} Trainer steps × {SMOL_BATCH} × {SMOL_SEQ} WikiText-2 valid "
        f"tokens (the same seeded windows for both fine-tunes), AdamW lr {SMOL_LR} {SMOL_SCHEDULER} (warmup "
        f"{SMOL_WARMUP}), wd 0.01, clip 1.0, all parameters. LN-free: the paper's order, 5 layers per step — "
        "post_attention_layernorm of layers 0-4, 5-9, … at steps 2-7, input_layernorm QK paths at 8-13, V paths at "
        f"14-19, final norm at {smol_schedule().last_step(30)} (0-based optimizer steps); σ estimated on the first "
        "batch, then an EMA (0.9) until each removal; position 0 keeps its own σ (`make_removable(model, "
        "position0=True)`), kept in the structural export. A run that reaches a NaN loss is stopped there. "
        "Perplexity: protocol (WikiText-2 test, 40 × 512).", "",
        "| row | steps | perplexity | structural export max abs Δlogit | s/step |", "|---|---|---|---|---|",
    ]
    for kind in ("original", "vanilla", "lnfree"):
        r = s.get(kind)
        if r:
            d = f"{r['structural_max_delta']:.1e}" if "structural_max_delta" in r else "—"
            ppl = r["perplexity"]
            if ppl is None:
                ppl = f"diverged (NaN loss at step {r['diverged_at']})"
            steps = r.get("steps", 0) if r.get("diverged_at") is None else f"{r['diverged_at']} of {r['steps']}"
            lines.append(f"| {kind} | {steps} | {ppl} | {d} | {r.get('s_per_step', '—')} |")
    lnf = s.get("lnfree")
    if lnf and lnf.get("diverged_at") is not None:
        finite = [v for v in lnf["train_losses"] if v is not None]
        lines += ["", SMOL_DIVERGED.format(step=lnf["diverged_at"], climb=f"{max(finite):.2f}", steps=SMOL_STEPS)]
    elif lnf and "vanilla" in s:
        lines += ["", f"LN-free lands {lnf['perplexity'] - s['vanilla']['perplexity']:+.3f} perplexity from vanilla."]
    lines += slow_lines(s)
    missing = [r for r in ROWS if r not in results]
    if missing:
        lines += ["", "Not measured: " + ", ".join(f"`{r}`" for r in missing) + "."]
    lines += ["", f"Loss curves: `benchmarks/{PLOT.name}` (dotted lines: the step each norm was removed).", ""]
    write_section(TITLE, "\n".join(lines) + "\n")


def slow_lines(s: dict) -> list[str]:
    """The slow pair: does one norm per few steps, with the auxiliary loss, keep SmolLM2 finite, and at what cost?"""
    dates = sorted({r["date"] for r in s.values() if "date" in r and r["row"].endswith("_slow")})
    lines = ["", f"**Slow removal** (`python benchmarks/ln_free.py --only smollm2:vanilla_slow smollm2:lnfree_slow`, "
             f"{versions()}, {' to '.join(dates) if dates else 'not run'}; 1 thread, shared cores): {SLOW_STEPS} Trainer steps × {SLOW_BATCH} × {SMOL_SEQ} tokens (the same "
             f"seeded windows), lr {SMOL_LR} constant after 10 warmup steps; LN-free removes one norm every {SLOW_GAP} "
             f"steps from step 10 in the paper's order (all gone at step {slow_schedule().last_step(30)}) with the "
             f"auxiliary residual-norm loss ({AUX_WEIGHT}); the vanilla row sees the same windows.", "",
             "| row | steps | perplexity | structural export max abs Δlogit | s/step |", "|---|---|---|---|---|"]
    for kind in ("vanilla_slow", "lnfree_slow"):
        r = s.get(kind)
        if r is None:
            lines.append(f"| {kind} | not measured | | | |")
            continue
        d = f"{r['structural_max_delta']:.1e}" if "structural_max_delta" in r else "—"
        ppl = r["perplexity"] if r["perplexity"] is not None else f"diverged (NaN loss at step {r['diverged_at']})"
        steps = r["steps"] if r.get("diverged_at") is None else f"{r['diverged_at']} of {r['steps']}"
        lines.append(f"| {kind} | {steps} | {ppl} | {d} | {r.get('s_per_step', '—')} |")
    a, b = s.get("lnfree_slow"), s.get("vanilla_slow")
    if a and b and a["perplexity"] is not None and b["perplexity"] is not None:
        means = [sum(a["train_losses"][i:i + 20]) / 20 for i in range(0, len(a["train_losses"]) - 19, 20)]
        lines += ["", f"Slow LN-free: no NaN, but perplexity {a['perplexity']} against its vanilla fine-tune's "
                      f"{b['perplexity']} ({a['perplexity'] / b['perplexity']:.0f}×). Training CE, 20-step means: "
                      + ", ".join(f"{m:.3g}" for m in means) + ": the loss blew up while the first MLP-input norms "
                      "went (steps 10-40) — the position-0 outliers of the forward probes below — and the model never "
                      "came back to the vanilla run's level before the last norms went."]
    elif a and a.get("diverged_at") is not None:
        lines += ["", f"Slow LN-free still diverged, at step {a['diverged_at']} (norms removed by then: "
                      f"{len([x for x in a['removed'] if x[0] < a['diverged_at']]) if a.get('removed') else 'see the curve'})."]
    return lines


def write_results_and_plot(results: dict) -> None:
    write_results(results)
    plot(results)


if __name__ == "__main__":
    main(ROWS, ROW_CACHE, run_row, write_results_and_plot)
