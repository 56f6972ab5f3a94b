"""KV cache compression on SmolLM2-135M: perplexity token by token through the cache, real cache bytes, decode speed.

A single prefill never reads the quantized part of a cache (every query attends to the fresh full-precision K/V),
so perplexity here feeds the WikiText-2 test windows **one token at a time**: token t is predicted from a cache
holding tokens < t exactly as the cache stores them. Rows: DynamicCache (fp32, bf16), transformers'
QuantizedCache (quanto, HQQ) when installed, our KIVI cache at uniform 4/2 bits and K4V2, KVTuner plans searched
at average 4 / 3 / 2.5 bits (exact knapsack; NSGA-II at 3 bits for comparison), CSKV at 50 % / 80 % channel
reduction with and without reconstruction training, and CSKV 80 % + 4-bit latents.

Every row is cached as JSON in ``~/.cache/hf_compress/bench_kv_cache/`` (a rerun resumes); rows that did not run
are written as "not measured". Speed rows are measured interleaved in one process (several repeats, median).

    nice -n 10 python benchmarks/kv_cache.py [--windows 2 --tokens 1024] [--only ROW ...] [--no-speed]
    python benchmarks/kv_cache.py --table-only
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _results import write_section  # noqa: E402

CACHE = Path(os.environ.get("HF_COMPRESS_BENCH_CACHE", Path.home() / ".cache" / "hf_compress" / "bench_kv_cache"))
PLOT = HERE / "smollm2_kv_cache.png"
TITLE = "## KV cache compression (SmolLM2-135M, token-by-token perplexity)"
TEST = HERE.parent.parent / "shared" / "data" / "wikitext-2" / "test.txt"
VALID = HERE.parent.parent / "shared" / "data" / "wikitext-2" / "valid.txt"

ROWS = {  # name -> label
    "dynamic-fp32": "DynamicCache fp32",
    "dynamic-bf16": "DynamicCache bf16 (bf16 model)",
    "quanto-4": "transformers QuantizedCache, quanto 4-bit",
    "quanto-2": "transformers QuantizedCache, quanto 2-bit",
    "hqq-4": "transformers QuantizedCache, HQQ 4-bit",
    "hqq-2": "transformers QuantizedCache, HQQ 2-bit",
    "kivi-8": "KIVI uniform KV8 (ours, packed)",
    "kivi-4": "KIVI uniform KV4 (ours, packed)",
    "kivi-k4v2": "KIVI uniform K4V2 (3.0 bits)",
    "kivi-2": "KIVI uniform KV2",
    "kvtuner-4": "KVTuner plan, ≤ 4.0 avg bits (knapsack)",
    "kvtuner-3": "KVTuner plan, ≤ 3.0 avg bits (knapsack)",
    "kvtuner-3-nsga2": "KVTuner plan, ≤ 3.0 avg bits (NSGA-II, 300 trials)",
    "kvtuner-2.5": "KVTuner plan, ≤ 2.5 avg bits (knapsack)",
    "cskv-50": "CSKV 50 % channels removed (ASVD init)",
    "cskv-80": "CSKV 80 % channels removed (ASVD init)",
    "cskv-50-trained": "CSKV 50 %, A/B reconstruction-trained",
    "cskv-80-trained": "CSKV 80 %, A/B reconstruction-trained",
    "cskv-80-trained-4bit": "CSKV 80 % trained + 4-bit latents",
}
SPEED_ROWS = ("dynamic-fp32", "kivi-4", "kivi-2", "kvtuner-3", "quanto-4", "hqq-4", "cskv-80-trained-4bit")
PAIRS = ("KV8", "K8V4", "KV4", "K4V2", "KV2")
CALIB = {"num_samples": 8, "seq_len": 512}
CSKV_TRAIN = {"num_samples": 16, "seq_len": 512, "steps": 200, "lr": 1e-3}


# -- models and caches -----------------------------------------------------------------------------------------------
_MODELS: dict = {}


def base_model(dtype_name: str = "float32"):
    import torch

    from hf_compress.models import load_model

    if dtype_name not in _MODELS:
        _MODELS[dtype_name] = load_model(None, dtype=getattr(torch, dtype_name))
        _MODELS[dtype_name][0].eval()
    return _MODELS[dtype_name]


def calibration(tokenizer):
    from hf_compress.calibration.data import CalibrationSpec, calibration_batches

    return calibration_batches(CalibrationSpec(str(VALID), CALIB["num_samples"], CALIB["seq_len"], 0), tokenizer)


def kvtuner_errors(model, tokenizer):
    """The per-layer pair-error table (cached: it is shared by every KVTuner row)."""
    import torch

    from hf_compress.methods.kvtuner import pair_errors, parse_pairs

    path = CACHE / "kvtuner_errors.json"
    if path.exists():
        return torch.tensor(json.loads(path.read_text()))
    errors = pair_errors(model, calibration(tokenizer), parse_pairs(PAIRS))
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(errors.tolist()))
    return errors


def setup(row: str):
    """(model, tokenizer, make_cache, info) for ``row``."""
    from transformers import DynamicCache, QuantizedCache

    from hf_compress.kv_cache import KVPlan, build_cache

    if row == "dynamic-bf16":
        model, tok = base_model("bfloat16")
        return model, tok, lambda: DynamicCache(config=model.config), {}
    model, tok = base_model()
    layers = model.config.num_hidden_layers
    if row == "dynamic-fp32":
        return model, tok, lambda: DynamicCache(config=model.config), {}
    if row.startswith(("quanto-", "hqq-")):
        backend, bits = row.split("-")
        kw = {"nbits": int(bits), "axis_key": 0, "axis_value": 0, "q_group_size": 32, "residual_length": 32}
        QuantizedCache(backend=backend, config=model.config, **kw)  # raises here when the backend is missing
        return model, tok, lambda: QuantizedCache(backend=backend, config=model.config, **kw), kw
    if row.startswith("kivi-"):
        k, v = {"kivi-8": (8, 8), "kivi-4": (4, 4), "kivi-k4v2": (4, 2), "kivi-2": (2, 2)}[row]
        plan = KVPlan.uniform(layers, k, v)
        return model, tok, lambda: build_cache(plan, model.config), {"avg_bits": plan.average_bits}
    if row.startswith("kvtuner-"):
        from hf_compress.methods.kvtuner import kv_plan

        parts = row.split("-")
        search = "nsga2" if parts[-1] == "nsga2" else "knapsack"
        kw = {"n_trials": 300, "seed": 0} if search == "nsga2" else {}
        plan = kv_plan(model, None, float(parts[1]), pairs=PAIRS, search=search, errors=kvtuner_errors(model, tok), **kw)
        info = {"avg_bits": plan.average_bits, "plan": plan.pairs(), "proxy_error": plan.extra["proxy_error"]}
        return model, tok, lambda: build_cache(plan, model.config), info
    if row.startswith("cskv-"):
        return setup_cskv(row, model, tok)
    raise ValueError(f"unknown row {row!r}")


def setup_cskv(row, model, tok):
    from hf_compress.methods.cskv import collect_scales, convert, train_reconstruction

    parts = row.split("-")
    reduction = int(parts[1]) / 100
    batches = calibration(tok)
    scales = collect_scales(model, batches)
    cskv = convert(model, reduction=reduction, scales=scales,
                   latent_bits=4 if parts[-1] == "4bit" else 16)
    info = {"reduction": reduction, "rank_k": cskv.config.cskv["rank_k"][0], "rank_v": cskv.config.cskv["rank_v"][0]}
    if "trained" in parts:
        # Training does not depend on the latent width: train once per reduction, reuse the A/B weights.
        from safetensors.torch import load_file, save_file

        weights, meta = CACHE / f"cskv-{parts[1]}-A_B.safetensors", CACHE / f"cskv-{parts[1]}-A_B-losses.json"
        if weights.exists():
            cskv.load_state_dict(load_file(weights), strict=False)
            info["train_loss_first_last"] = json.loads(meta.read_text())
        else:
            losses = train_reconstruction(cskv, model, calibration_train(tok), steps=CSKV_TRAIN["steps"],
                                          lr=CSKV_TRAIN["lr"])
            info["train_loss_first_last"] = [losses[0], losses[-1]]
            names = {n for n, _ in cskv.named_parameters() if n.rsplit(".", 2)[-2] in ("k_a", "k_b", "v_a", "v_b")}
            save_file({n: p.detach().contiguous() for n, p in cskv.named_parameters() if n in names}, weights)
            meta.write_text(json.dumps(info["train_loss_first_last"]))
    return cskv, tok, cskv.planned_cache, info


def calibration_train(tokenizer):
    from hf_compress.calibration.data import CalibrationSpec, calibration_batches

    return calibration_batches(CalibrationSpec(str(VALID), CSKV_TRAIN["num_samples"], CSKV_TRAIN["seq_len"], 1), tokenizer)


# -- measurements ----------------------------------------------------------------------------------------------------
def test_windows(tokenizer, windows: int, tokens: int):
    from hf_compress.calibration.data import tokenize_text

    ids = tokenize_text(TEST.read_text(), tokenizer)
    return ids[: windows * tokens].view(windows, tokens)


def token_by_token_nll(model, make_cache, window):
    """Sum of NLL of tokens 1..T-1, each predicted through the cache from the tokens before it; cache bytes at the end."""
    import torch
    import torch.nn.functional as F

    from hf_compress.kv_cache import cache_bytes

    cache = make_cache()
    nll = 0.0
    with torch.no_grad():
        for t in range(window.numel() - 1):
            out = model(window[None, t : t + 1], cache=cache, use_cache=True)
            cache = out.past_key_values
            nll += float(F.cross_entropy(out.logits[0, -1].float(), window[t + 1]))
    return nll, cache_bytes(cache)


def measure_row(row: str, windows: int, tokens: int) -> dict:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    model, tok, make_cache, info = setup(row)
    setup_s = time.perf_counter() - start
    total, count, size = 0.0, 0, None
    for window in tqdm(test_windows(tok, windows, tokens), desc=row):
        nll, b = token_by_token_nll(model, make_cache, window)
        total, count, size = total + nll, count + window.numel() - 1, size or b
    return {"row": row, "ppl": math.exp(total / count), "cache_bytes": size, "windows": windows, "tokens": tokens,
            "setup_s": setup_s, "eval_s": time.perf_counter() - start - setup_s, **info,
            "date": datetime.date.today().isoformat()}


def measure_speed(rows, tokens: int, steps: int, repeats: int) -> dict:
    """Decode tokens/s after a ``tokens``-long prefill, rows interleaved per repeat, median of ``repeats``."""
    import torch

    ready = {}
    for row in rows:
        try:
            ready[row] = setup(row)
        except Exception as exc:  # noqa: BLE001 - a missing backend or method: that row is "not measured"
            print(f"speed: {row} skipped ({exc})", file=sys.stderr)
    times = {row: [] for row in ready}
    for _ in range(repeats):
        for row, (model, tok, make_cache, _) in ready.items():
            ids = test_windows(tok, 1, tokens + steps)[0]
            with torch.no_grad():
                cache = make_cache()
                out = model(ids[None, :tokens], cache=cache, use_cache=True)
                start = time.perf_counter()
                for t in range(tokens, tokens + steps):
                    out = model(ids[None, t : t + 1], cache=out.past_key_values, use_cache=True)
                times[row].append(steps / (time.perf_counter() - start))
    return {row: {"tokens_per_s": statistics.median(v), "all": v, "context": tokens, "steps": steps}
            for row, v in times.items()}


# -- results ---------------------------------------------------------------------------------------------------------
def load_rows() -> dict:
    return {r: json.loads((CACHE / f"{r}.json").read_text()) for r in ROWS if (CACHE / f"{r}.json").exists()}


def write_results(args) -> None:
    import torch
    import transformers

    rows = load_rows()
    speed = json.loads((CACHE / "speed.json").read_text()) if (CACHE / "speed.json").exists() else {}
    ref = rows.get("dynamic-fp32")
    bf16 = rows.get("dynamic-bf16")
    lines = [TITLE, "",
             f"Command: `nice -n 10 python benchmarks/kv_cache.py --windows {args.windows} --tokens {args.tokens}`. "
             f"Machine: {platform.machine()}, {os.cpu_count()} shared CPU cores, torch {torch.__version__} "
             f"({args.threads} thread), transformers {transformers.__version__}; measured "
             f"{', '.join(sorted({r['date'] for r in rows.values()})) or 'never'}.",
             "",
             f"Perplexity: WikiText-2 test, the first {args.windows} non-overlapping windows of {args.tokens} tokens, "
             "fed **one token at a time** through the cache (each token predicted from the cache as stored). Cache "
             "bytes: what the cache object really holds after the last token of a window (packed codes, float16 "
             "scales/zeros, the full-precision window; for CSKV the latents plus the window). Δ ppl is against "
             "DynamicCache fp32; memory saving against DynamicCache bf16 (the serving baseline). Group 32, a "
             "32-token full-precision window everywhere (transformers' QuantizedCache: its default axes, "
             "`axis_key=axis_value=0`, `q_group_size=32`, `residual_length=32`). KVTuner plans are searched on "
             "8 × 512 tokens of WikiText-2 validation (attention-output error per layer and pair). CSKV: ranks "
             "rounded to multiples of 8, ASVD α = 0.5 on the same calibration windows; training = 200 Adam steps "
             "(lr 1e-3, 2048-token minibatches) per layer on 16 × 512 validation tokens. Rows marked \"not "
             "measured\" did not finish within the session (about 10 minutes per 1024-token window on this machine).",
             "",
             "| cache | ppl | Δ ppl vs fp32 | cache bytes | vs bf16 | avg bits (nominal) | notes |",
             "|---|---|---|---|---|---|---|"]
    for row, label in ROWS.items():
        r = rows.get(row)
        if r is None:
            lines.append(f"| {label} | not measured | | | | | {unmeasured_plan_note(row)} |")
            continue
        delta = f"{100 * (r['ppl'] / ref['ppl'] - 1):+.2f} %" if ref else ""
        ratio = r["cache_bytes"] / bf16["cache_bytes"] if bf16 else None
        saving = "" if ratio is None else f"{100 * (1 - ratio):.1f} % less" if ratio < 1 else f"{ratio:.2f}×"
        bits = r.get("avg_bits", "")
        notes = " ".join(r.get("plan", [])) if "plan" in r else ""
        if "rank_k" in r:
            notes = f"rank K {r['rank_k']}, V {r['rank_v']} per layer (of 192)"
        lines.append(f"| {label} | {r['ppl']:.3f} | {delta} | {r['cache_bytes'] / 2**20:.2f} MiB | {saving} | "
                     f"{bits if bits == '' else f'{bits:.2f}'} | {notes} |")
    lines += ["", f"Decode speed (tokens/s, batch 1, {args.speed_steps} steps after a {args.tokens}-token prefill, "
              f"rows interleaved, median of {args.speed_repeats}; ratio to DynamicCache fp32). The 2 cores were shared "
              "with other jobs (load average about 10), which is why DynamicCache decodes at only a few tokens/s; "
              "the ratios are the result, the absolute numbers are not. Our caches dequantize their stored part in "
              "plain torch at every step (no fused kernel):", "",
              "| cache | tokens/s | × DynamicCache |", "|---|---|---|"]
    base = speed.get("dynamic-fp32", {}).get("tokens_per_s")
    for row in dict.fromkeys([*SPEED_ROWS, *speed]):
        s = speed.get(row)
        if s is None:
            lines.append(f"| {ROWS[row]} | not measured | |")
        else:
            lines.append(f"| {ROWS[row]} | {s['tokens_per_s']:.1f} | {s['tokens_per_s'] / base:.2f} |" if base else
                         f"| {ROWS[row]} | {s['tokens_per_s']:.1f} | |")
    lines += ["", goals(rows, speed), ""]
    if rows:
        plot(rows)
        lines.append(f"![perplexity vs cache bytes]({PLOT.name})")
    write_section(TITLE, "\n".join(lines))


def unmeasured_plan_note(row: str) -> str:
    """For a KVTuner row that did not run: its plan (searching is cheap once the error table exists), and the
    uniform row it coincides with, if any."""
    if not row.startswith("kvtuner-") or row.endswith("nsga2") or not (CACHE / "kvtuner_errors.json").exists():
        return ""
    import torch

    from hf_compress.kv_cache.quantizer import pair_name
    from hf_compress.methods.kvtuner import knapsack_search, parse_pairs

    pairs = parse_pairs(PAIRS)
    errors = torch.tensor(json.loads((CACHE / "kvtuner_errors.json").read_text()))
    names = [pair_name(*pairs[j]) for j in knapsack_search(errors, pairs, float(row.split("-")[1]))]
    if len(set(names)) == 1:
        return f"searched plan = uniform {names[0]} in every layer: the same cache as the uniform {names[0]} row"
    return "plan: " + " ".join(names)


def goals(rows, speed) -> str:
    out = ["Goals:"]
    ref, bf16 = rows.get("dynamic-fp32"), rows.get("dynamic-bf16")
    k3, uni = rows.get("kvtuner-3"), rows.get("kivi-k4v2")
    if ref and k3:
        d = 100 * (k3["ppl"] / ref["ppl"] - 1)
        out.append(f"- KVTuner ≤ 3.0 bits within +1 % of the 16-bit cache: {d:+.2f} % → {'met' if d <= 1 else 'not met'}"
                   + (f"; vs uniform K4V2 at equal nominal bits ({k3['cache_bytes'] / 2**20:.2f} vs "
                      f"{uni['cache_bytes'] / 2**20:.2f} MiB): {k3['ppl']:.3f} vs {uni['ppl']:.3f} → "
                      f"{'better' if k3['ppl'] < uni['ppl'] else 'not better'}" if uni else ""))
    else:
        out.append("- KVTuner ≤ 3.0 bits within +1 %: not measured")
    c = rows.get("cskv-80-trained-4bit")
    if c and bf16 and ref:
        s, d = 100 * (1 - c["cache_bytes"] / bf16["cache_bytes"]), 100 * (c["ppl"] / ref["ppl"] - 1)
        out.append(f"- CSKV 80 % + 4-bit: {s:.1f} % less memory than bf16 (goal ≥ 90 %), {d:+.2f} % ppl (goal ≤ +5 %) → "
                   f"{'met' if s >= 90 and d <= 5 else 'not met'}")
    else:
        out.append("- CSKV 80 % + 4-bit: not measured")
    base = speed.get("dynamic-fp32", {}).get("tokens_per_s")
    ratios = {r: s["tokens_per_s"] / base for r, s in speed.items() if base and r != "dynamic-fp32"}
    out.append("- decode ≥ 0.8× DynamicCache: " + (", ".join(f"{ROWS[r]} {v:.2f}×" for r, v in ratios.items())
                                                   if ratios else "not measured"))
    return "\n".join(out)


def plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for row, r in rows.items():
        family = row.split("-")[0]
        ax.scatter(r["cache_bytes"] / 2**20, r["ppl"], label=ROWS[row], s=30,
                   marker={"dynamic": "s", "kivi": "o", "kvtuner": "*", "cskv": "^"}.get(family, "x"))
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("cache bytes at the end of the window (MiB, log)"), ax.set_ylabel("token-by-token perplexity (log)")
    ax.set_title("SmolLM2-135M KV cache: quality vs real memory")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--only", nargs="*", help="rows to run (default: all)")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--speed-steps", type=int, default=32)
    parser.add_argument("--speed-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--speed-only", action="store_true", help="measure only the speed rows")
    parser.add_argument("--speed-rows", nargs="*", help=f"speed rows (default: {' '.join(SPEED_ROWS)})")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if not args.table_only:
        CACHE.mkdir(parents=True, exist_ok=True)
        for row in [] if args.speed_only else args.only or ROWS:
            path = CACHE / f"{row}.json"
            if path.exists():
                continue
            try:
                result = measure_row(row, args.windows, args.tokens)
            except Exception as exc:  # noqa: BLE001 - recorded as "not measured", the reason printed
                print(f"row {row} not measured: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                continue
            path.write_text(json.dumps(result))
            print(json.dumps(result), flush=True)
            write_results(args)
        if not args.no_speed and not (CACHE / "speed.json").exists():
            speed = measure_speed(args.speed_rows or SPEED_ROWS, args.tokens, args.speed_steps, args.speed_repeats)
            (CACHE / "speed.json").write_text(json.dumps(speed))
    write_results(args)


if __name__ == "__main__":
    main()
