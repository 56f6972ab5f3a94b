"""FP32 vs RTN vs GPTQ at 4/3/2 bits, group 64, on SmolLM2-135M-Instruct → benchmarks/RESULTS.md.

Protocol: ../shared/notes/benchmark-protocol.md (WikiText-2 test, first 40 windows of 512 tokens; calibration
32 × 512 tokens of WikiText-2 valid at offsets seeded with 0; decoder Linears only; group 64 because the model's
weights already sit on a 4-bit group-32 grid). Each row runs in its own process so its peak RSS is its own.

    python benchmarks/quantization.py            # all rows, then rewrites the section in RESULTS.md
    python benchmarks/quantization.py --row gptq:3   # one row, JSON on stdout
    python benchmarks/quantization.py --quality      # the "Quality at a bits budget" section (cached rows) + plot
    python benchmarks/quantization.py --quality --table-only   # rewrite that section and plot from cached rows
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this working tree, not an installed copy
from _results import write_section  # noqa: E402

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
    ap.add_argument("--row", choices=ROWS + QUALITY_ROWS)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--quality", action="store_true", help="the quality-at-a-budget rows (issue 20), cached")
    ap.add_argument("--only", nargs="*", help="with --quality: just these rows")
    ap.add_argument("--table-only", action="store_true", help="with --quality: run nothing, write from the cache")
    args = ap.parse_args()
    if args.row in QUALITY_ROWS:
        result = {**run_quality_row(args.row), "date": datetime.date.today().isoformat()}
        QUALITY_CACHE.dir.mkdir(parents=True, exist_ok=True)
        QUALITY_CACHE.path(args.row).write_text(json.dumps(result))
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.row:
        print("RESULT " + json.dumps(run_row(args.row)), flush=True)
        return
    if args.quality:
        if not args.table_only:
            for row in args.only or QUALITY_ROWS:
                QUALITY_CACHE.ensure(row)
        write_quality(QUALITY_CACHE.cached(QUALITY_ROWS))
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


# -- Quality at a bits budget (issue 20) ---------------------------------------------------------------------------
# Row grammar: METHOD[:ARGS][:rot][:rN]. gptq:B (uniform), hi:LOW-HIGH:CODE_BITS (high-impact channels at an average
# code width chosen so the realised bits/weight land at the budget), fp32. ":rot": rotated model (--rotate);
# ":rN": N rounds of the grid refit (solvers/refit.py). The high-impact rows read the sensitivity profile of
# benchmarks/mixed_precision.py (its cache folder; `python benchmarks/mixed_precision.py --row profile`).
from _rows import RowCache, measured_on  # noqa: E402

QUALITY_TITLE = "## Quality at a bits budget on SmolLM2-135M-Instruct: grid refit, rotation, mixed widths (group 64)"
QUALITY_ROWS = ["fp32", "gptq:4:r1", "gptq:3:r1", "rot:4:r1", "hi:3-4:3.15:wide:r1", "hi:2-3:2.17:wide:r1",
                "hi:3-4:3.15:r1", "gptq:4", "gptq:3", "hi:2-3:2.17:r1"]
# ":wide": the high-impact planner may also keep a module whole at either width or give it up to half its
# channels at the high width (the paper's shares stop at 20 %), so the budget can go to the most sensitive modules.
WIDE_RATIOS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
QUALITY_CACHE = RowCache("bench_quality", __file__)
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
BUDGETS = [(4.5, 26.9), (3.5, 29.0), (2.5, 40.0)]  # (bits/weight at most, perplexity goal)


def quality_config(row: str):
    import hf_compress

    parts = row.split(":")
    extra = {"group_size": GROUP}
    while parts[-1] in ("rot", "wide") or (parts[-1].startswith("r") and parts[-1][1:].isdigit()):
        flag = parts.pop()
        if flag == "rot":
            extra["rotate"] = True
        elif flag == "wide":
            extra["ratios"] = WIDE_RATIOS
        else:
            extra["refit"] = int(flag[1:])
    kind = parts[0]
    if kind == "gptq" or kind == "rot":
        return hf_compress.GPTQConfig(bits=int(parts[1]), **({"rotate": True} if kind == "rot" else {}), **extra)
    if kind == "hi":
        low, high = map(int, parts[1].split("-"))
        prof = RowCache("bench_mixed_precision", "").dir / "profile"
        return hf_compress.HighImpactConfig(target_bits=float(parts[2]), low_bits=low, high_bits=high,
                                            profile=str(prof), **extra)
    raise ValueError(f"unknown quality row {row!r}")


def run_quality_row(row: str) -> dict:
    import hf_compress
    from hf_compress.calibration.data import default_text_source
    from hf_compress.evaluation import perplexity
    from hf_compress.report import size_report

    model, tok, calib = _setup()
    out = {"row": row}
    if row == "fp32":
        out.update(quantize_s=0.0, bits_per_weight=32.0, code_bits=32.0)
    else:
        config = quality_config(row)
        t = time.perf_counter()
        hf_compress.quantize(model, config, calibration=calib, tokenizer=tok)
        out["quantize_s"] = round(time.perf_counter() - t, 1)
        report = size_report(model)
        planned = [(spec, model.get_submodule(n)) for n, spec in config.plan_specs().items()]
        code = sum(s.code_bits(m.in_features) * m.in_features * m.out_features for s, m in planned)
        out["bits_per_weight"] = round(report.bits_per_weight, 3)
        out["code_bits"] = round(code / report.quantized_weights, 3)
    out["perplexity"] = round(perplexity(model, tok, default_text_source("test"), 512, 40), 3)
    out["shakespeare"] = round(perplexity(model, tok, str(SHAKESPEARE), 512, 40), 3)
    return out


def reference_points() -> dict[str, list[tuple[float, float]]]:
    """(bits/weight, perplexity) of the earlier sections of RESULTS.md (quantization, mixed precision, RSQ)."""
    from _results import RESULTS

    text = RESULTS.read_text() if RESULTS.exists() else ""
    series: dict[str, list] = {}

    def table(title):
        start = text.find(title)
        if start < 0:
            return []
        end = text.find("\n## ", start + 1)
        return [[c.strip() for c in l.strip().strip("|").split("|")] for l in text[start:end].splitlines()
                if l.startswith("| ") and not l.startswith("| method") and not l.startswith("| bits")]

    for c in table("## Quantization: FP32, RTN and GPTQ"):
        if c[0] in ("rtn", "gptq"):
            series.setdefault(f"{c[0].upper()} (earlier)", []).append((float(c[3]), float(c[2])))
    for c in table("## Mixed precision on SmolLM2"):
        if c[3] != "not measured" and not c[0].startswith("uniform"):
            series.setdefault(f"{c[0]} (earlier)", []).append((float(c[3]), float(c[4])))
    for c in table("## RSQ on SmolLM2"):
        if c[1] != "GPTQ":
            series.setdefault(f"{c[1].split(' (')[0]} (earlier)", []).append((float(c[2]), float(c[3])))
    return series


QUALITY_LABELS = {"gptq": "GPTQ", "rot": "GPTQ + rotation", "hi": "high-impact"}


def quality_label(row: str) -> str:
    parts = row.split(":")
    name = QUALITY_LABELS.get(parts[0], parts[0])
    if "rot" in parts[1:]:
        name += " + rotation"
    refit = [p for p in parts[1:] if p.startswith("r") and p[1:].isdigit()]
    if "wide" in parts[1:]:
        name += " (shares 0–100 %)"
    return name + (f" + refit ×{refit[0][1:]}" if refit else "")


def shakespeare_check(results: dict[str, dict]) -> list[str]:
    """Each variant against its plain counterpart on both texts, and every row's perplexity relative to fp32."""
    out = []
    for row, r in results.items():
        parts = row.split(":")
        base = ":".join(p for p in parts if not (p.startswith("r") and p[1:].isdigit()))
        if base != row and base in results:
            b = results[base]
            out.append(f"- `{row}` vs `{base}`: WikiText-2 {b['perplexity']} → {r['perplexity']}, TinyShakespeare "
                       f"{b['shakespeare']} → {r['shakespeare']}")
    fp = results.get("fp32")
    if fp:
        ratios = [f"`{row}` ×{r['perplexity'] / fp['perplexity']:.3f} / ×{r['shakespeare'] / fp['shakespeare']:.3f}"
                  for row, r in sorted(results.items(), key=lambda kv: -kv[1]["bits_per_weight"]) if row != "fp32"]
        out.append(f"- perplexity relative to fp32 (WikiText-2 / TinyShakespeare; fp32 {fp['perplexity']} / "
                   f"{fp['shakespeare']}): " + ", ".join(ratios))
    return out or ["- not measured"]


def write_quality(results: dict[str, dict]) -> None:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    here = Path(__file__).resolve().parent
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    for name, pts in sorted(reference_points().items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", ls=":", alpha=0.6, label=name)
    series: dict[str, list] = {}
    for row, r in results.items():
        if row != "fp32":
            series.setdefault(quality_label(row), []).append((r["bits_per_weight"], r["perplexity"]))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=7, label=name)
    for bpw, goal in BUDGETS:
        ax.plot([bpw], [goal], marker="*", ms=14, color="k", ls="none")
    ax.plot([], [], marker="*", ms=10, color="k", ls="none", label="issue 20 goals")
    if "fp32" in results:
        ax.axhline(results["fp32"]["perplexity"], color="grey", lw=0.8, label="fp32")
    ax.set_yscale("log")
    ax.set_xlim(2.1, 4.6)
    ax.set_ylim(24, 130)
    ax.set_xlabel("realised bits per weight (codes + scales + zero points + column maps)")
    ax.set_ylabel("WikiText-2 perplexity (40 × 512)")
    ax.set_title("SmolLM2-135M-Instruct, decoder Linears, group 64")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(here / "smollm2_quality.png", dpi=110)
    plt.close(fig)

    lines = [QUALITY_TITLE, "",
             f"Command: `python benchmarks/quantization.py --quality` · machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"no GPU · {versions()} · date: {measured_on(results)}", "",
             "Protocol as in the quantization section (WikiText-2 test 40 × 512; calibration 32 × 512 of WikiText-2 valid, "
             "seed 0; decoder Linears; group 64, integer zero points; GPTQ damp 0.01, act-order, static groups, clip search). "
             "Bits/weight count every stored byte of the quantized Linears: codes, fp16 scales, packed zero points and the "
             "per-column width bytes of mixed modules. TinyShakespeare: the first 40 × 512-token windows of "
             "`shared/data/tinyshakespeare/input.txt`, same tokenizer. Refit ×N (`refit=N`, `solvers/refit.py`): after GPTQ, "
             "each row's scales and integer zero points are refitted to the chosen codes by least squares under the full "
             "layer Hessian (N − 1 more rounds re-run GPTQ on the refitted grid); it stores nothing extra. Rotation: "
             "`rotate=True` (RSQ section). High-impact rows: Fisher-ranked 4-bit (or 3-bit) channels over 3-bit (2-bit), "
             "shares per module from the mixed-precision profile, average code width set so the realised bits/weight "
             "land just under the budget; \"shares 0–100 %\": candidate shares {0, 2, 5, 10, 15, 20, 30, 50, 100} % instead "
             "of the paper's {2, 5, 10, 15, 20} %.", "",
             "![perplexity against bits, every method](smollm2_quality.png)", "",
             "| method | row | code bits | bits/weight | WikiText-2 ppl | TinyShakespeare ppl | quantize time (s) |",
             "|---|---|---|---|---|---|---|"]
    for row in QUALITY_ROWS:
        r = results.get(row)
        if r is None:
            lines.append(f"| {quality_label(row)} | `{row}` | not measured | not measured | not measured | not measured | not measured |")
        else:
            lines.append(f"| {quality_label(row) if row != 'fp32' else 'fp32'} | `{row}` | {r['code_bits']} | "
                         f"{r['bits_per_weight']} | {r['perplexity']} | {r['shakespeare']} | {r['quantize_s']} |")
    goals = []
    earlier = [(ppl, f"{name}", b) for name, pts in reference_points().items() for b, ppl in pts]
    for bpw, goal in BUDGETS:
        fits = [(r["perplexity"], f"`{row}`", r["bits_per_weight"]) for row, r in results.items()
                if row != "fp32" and r["bits_per_weight"] <= bpw] + [e for e in earlier if e[2] <= bpw]
        if not fits:
            goals.append(f"≤ {bpw} bpw: ppl ≤ {goal} — no row measured")
            continue
        ppl, row, b = min(fits)
        verdict = "met" if ppl <= goal else f"not met, gap {ppl - goal:+.2f}"
        goals.append(f"≤ {bpw} bpw: ppl ≤ {goal} — best {row} {ppl} at {b} bpw: {verdict}")
    lines += ["", "Goals (issue 20; best row at or under each budget, this table and the earlier sections): "]
    lines += [f"- {g}" for g in goals]
    lines += ["", "TinyShakespeare check (is a gain WikiText-only?):", ""] + shakespeare_check(results)
    lines += ["", "Rows marked not measured are defined (`--only ROW` runs one) but were not run yet: on 2 CPU cores shared "
              "with other jobs (load about 7) one GPTQ row took about 35 minutes of wall clock."]
    write_section(QUALITY_TITLE, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
