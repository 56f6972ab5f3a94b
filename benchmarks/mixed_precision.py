"""Mixed precision on SmolLM2-135M-Instruct: perplexity against realised bits for every planner on one profile.

Uniform GPTQ, BAQ (column and module granularity), Layer-wise Quantization (3/2-bit mixes ranked by LIM, ZD and a
random control) and high-impact ratios, all GPTQ group 64, protocol of benchmarks/quantization.py. Pass 1 (the
sensitivity profile: GPTQ column losses, LIM, ZD, Fisher) is measured once and every planner reads it; its time is
reported on its own row. Each row runs in its own process; finished rows are kept in a cache folder, so an
interrupted run resumes.

    python benchmarks/mixed_precision.py                 # every missing row, then the table and the plot
    python benchmarks/mixed_precision.py --only baq:col:3.0 gptq:3   # just these rows (then the table)
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402
from _rows import RowCache, main  # noqa: E402
from quantization import _setup, versions  # noqa: E402  (shared protocol set-up)

HERE = Path(__file__).resolve().parent
TITLE = "## Mixed precision on SmolLM2-135M-Instruct: perplexity against realised bits (GPTQ g64)"
GROUP = 64
# In priority order: the acceptance comparisons first.
# baq:col:2.92 and 2.42 spend as many realised bits/weight as uniform 3-bit and the 2/3-bit mixes at 2.5 (BAQ's
# segments and width bytes cost about 0.08 bits/weight more than a uniform grid), for comparisons at equal size.
ROWS = ["profile", "baq:col:3.0", "gptq:3", "baq:col:2.5", "lw:lim:2.5", "lw:zd:2.5", "lw:random:2.5",
        "baq:mod:2.5", "baq:mod:3.0", "hi:2-3:2.1", "hi:3-4:3.1", "baq:col:2.92", "baq:col:2.42", "gptq:2", "gptq:4",
        "baq:col:2.25", "baq:col:3.5"]


def profile_dir() -> Path:
    return ROW_CACHE.dir / "profile"


def config_for(row: str):
    import hf_compress

    kind, *args = row.split(":")
    prof = str(profile_dir())
    if kind == "gptq":
        return hf_compress.GPTQConfig(bits=int(args[0]), group_size=GROUP)
    if kind == "rot":  # GPTQ on the rotated model (QuaRot-style, weight-only)
        return hf_compress.GPTQConfig(bits=int(args[0]), group_size=GROUP, rotate=True)
    if kind == "rsq":
        return hf_compress.RSQConfig(bits=int(args[0]), group_size=GROUP, r_min=0.01)
    if kind == "baq":
        return hf_compress.BAQConfig(target_bits=float(args[1]), granularity={"col": "column", "mod": "module"}[args[0]],
                                     group_size=GROUP, profile=prof)
    if kind == "lw":
        return hf_compress.LayerwiseQuantConfig(score=args[0], high_bits=3, low_bits=2, target_bits=float(args[1]),
                                                group_size=GROUP, profile=prof)
    if kind == "hi":
        low, high = map(int, args[0].split("-"))
        return hf_compress.HighImpactConfig(target_bits=float(args[1]), low_bits=low, high_bits=high, group_size=GROUP,
                                            profile=prof)
    raise ValueError(f"unknown row {row!r}")


def run_row(row: str) -> dict:
    import hf_compress
    from hf_compress.calibration.data import default_text_source
    from hf_compress.evaluation import perplexity
    from hf_compress.report import size_report

    model, tok, calib = _setup()
    t = time.perf_counter()
    if row == "profile":
        hf_compress.profile(model, calib, tok, bits=3, group_size=GROUP, fisher_samples=8).save(profile_dir())
        return {"row": row, "quantize_s": round(time.perf_counter() - t, 1)}
    config = config_for(row)
    hf_compress.quantize(model, config, calibration=calib, tokenizer=tok)
    seconds = time.perf_counter() - t
    report = size_report(model)
    planned = [(spec, model.get_submodule(n)) for n, spec in config.plan_specs().items()]
    code_bits = sum(s.code_bits(m.in_features) * m.in_features * m.out_features for s, m in planned) / report.quantized_weights
    return {"row": row, "perplexity": round(perplexity(model, tok, default_text_source("test"), 512, 40), 3),
            "bits_per_weight": round(report.bits_per_weight, 3), "code_bits": round(code_bits, 3),
            "quantize_s": round(seconds, 1)}


class MixedRowCache(RowCache):
    """Every planner row reads the sensitivity profile, so that row runs first."""

    def ensure(self, row: str) -> dict:
        if row != "profile" and not self.path(row).exists() and not (profile_dir() / "sensitivity_profile.json").exists():
            super().ensure("profile")
        return super().ensure(row)


ROW_CACHE = MixedRowCache("bench_mixed_precision", __file__)


LABELS = {"gptq": "uniform GPTQ", "baq:col": "BAQ (column)", "baq:mod": "BAQ (module)", "lw:lim": "Layer-wise LIM 3/2",
          "lw:zd": "Layer-wise ZD 3/2", "lw:random": "Layer-wise random 3/2", "hi": "high-impact ratios"}


def label(row: str) -> str:
    for key in sorted(LABELS, key=len, reverse=True):
        if row.startswith(key):
            return LABELS[key]
    return row


def write_results(results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: dict[str, list] = {}
    for row, r in results.items():
        if "perplexity" in r:
            series.setdefault(label(row), []).append((r["bits_per_weight"], r["perplexity"]))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("realised bits per weight (codes + scales + zero points + column widths)")
    ax.set_ylabel("WikiText-2 perplexity (40 × 512)")
    ax.set_title("SmolLM2-135M-Instruct, GPTQ group 64")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "smollm2_mixed_precision.png", dpi=110)
    plt.close(fig)

    prof = results.get("profile", {}).get("quantize_s", "not measured")
    lines = [TITLE, "",
             f"Command: `python benchmarks/mixed_precision.py` · machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU · "
             f"{versions()} · date: {datetime.date.today().isoformat()}", "",
             "Protocol as in the quantization section (WikiText-2 test 40 × 512; calibration 32 × 512 of WikiText-2 valid, seed 0). "
             "Every planner reads one sensitivity profile (pass 1: GPTQ 3-bit g64 column losses, LIM, ZD, Fisher from 8 windows), "
             f"measured once in {prof} s and not included in the per-row times. Code bits: mean code width; bits/weight adds fp16 "
             "scales, packed zero points and the per-column width bytes. Layer-wise rows move the least important layers from "
             "3 to 2 bits. High-impact rows: low/high widths, Fisher-ranked input channels, ratios {2, 5, 10, 15, 20} %.", "",
             "![perplexity against bits](smollm2_mixed_precision.png)", "",
             "| method | row | code bits | bits/weight | perplexity | quantize time (s) |", "|---|---|---|---|---|---|"]
    for row in ROWS[1:]:
        r = results.get(row)
        if r is None:
            lines.append(f"| {label(row)} | `{row}` | not measured | not measured | not measured | not measured |")
        else:
            lines.append(f"| {label(row)} | `{row}` | {r['code_bits']} | {r['bits_per_weight']} | {r['perplexity']} | {r['quantize_s']} |")
    lines += ["", "Comparisons the mixed-precision issue asks for, computed from the rows above:", ""]
    lines += [f"- {c}" for c in comparisons(results)]
    write_section(TITLE, "\n".join(lines) + "\n")


def comparisons(results: dict[str, dict]) -> list[str]:
    """Each claim with its numbers and whether it holds here; rows not measured say so."""

    def ppl(row):
        r = results.get(row)
        return None if r is None else (r["perplexity"], r["bits_per_weight"])

    def claim(text, a, b):
        pa, pb = ppl(a), ppl(b)
        if pa is None or pb is None:
            return f"{text}: not measured"
        verdict = "holds" if pa[0] < pb[0] else "does not hold"
        return f"{text}: `{a}` {pa[0]} at {pa[1]} bits/weight vs `{b}` {pb[0]} at {pb[1]} — {verdict}"

    mixes = [r for r in ("lw:lim:2.5", "lw:zd:2.5", "lw:random:2.5") if r in results]
    best_mix = min(mixes, key=lambda r: results[r]["perplexity"]) if mixes else "lw:lim:2.5"
    return [
        claim("BAQ (column) below uniform GPTQ 3-bit at equal realised bits", "baq:col:2.92", "gptq:3"),
        claim("BAQ (column) below uniform GPTQ 3-bit at equal code bits (3.0)", "baq:col:3.0", "gptq:3"),
        claim("BAQ (column) below the best 2/3-bit uniform mix at equal realised bits", "baq:col:2.42", best_mix),
        claim("BAQ (column) below the best 2/3-bit uniform mix at equal code bits (2.5)", "baq:col:2.5", best_mix),
        claim("LIM ordering below random ordering (2.5)", "lw:lim:2.5", "lw:random:2.5"),
        claim("ZD ordering below random ordering (2.5)", "lw:zd:2.5", "lw:random:2.5"),
        claim("BAQ (module) below uniform GPTQ 3-bit (3.0)", "baq:mod:3.0", "gptq:3"),
    ]


if __name__ == "__main__":
    main(ROWS, ROW_CACHE, run_row, write_results)
