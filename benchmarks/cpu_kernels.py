"""The measurements behind the CPU kernel choices in ``kernels/cpu_linear.py`` (one command, one process).

    python benchmarks/cpu_kernels.py [--repeats 20]

1. Where dequantize-per-call + bf16 GEMM beats the int4 kernel (``LARGE_M``): SmolLM2's three linear shapes,
   4-bit g64, M = 1 … 512 rows.
2. Grouped 8-bit (no CPU op takes groups): a dense bf16 copy vs one ``_weight_int8pack_mm`` call per group vs
   dequantize per call.
3. ``_weight_int8pack_mm`` with K not a multiple of 16 (why inputs are padded): relative error unpadded.
Median of ``--repeats`` timings per cell, ms per call. Writes "## CPU kernel choices" in RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

from _results import write_section

TITLE = "## CPU kernel choices"


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return sorted(samples)[len(samples) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    import torch

    from hf_compress.formats.grid import QuantSpec
    from hf_compress.formats.linear import PackedLinear
    from hf_compress.kernels.cpu_linear import LARGE_M, shift_dequantizer
    from hf_compress.kernels.dispatch import cpu_plan
    from hf_compress.solvers.rtn import rtn_quantize

    torch.manual_seed(0)
    bf16 = torch.bfloat16
    lines = [TITLE, "", f"Command: `python benchmarks/cpu_kernels.py --repeats {args.repeats}` · machine: "
             f"{platform.machine()}, {os.cpu_count()} CPU cores · torch {torch.__version__}, Python "
             f"{platform.python_version()} · date: {datetime.date.today().isoformat()}", "",
             f"1. int4 kernel vs dequantize + bf16 GEMM, 4-bit g64, ms per call (median of {args.repeats}); the library "
             f"switches at LARGE_M = {LARGE_M} rows.", "", "| N × K | M | int4 kernel | dequantize + GEMM |", "|---|---|---|---|"]
    for n, k in ((576, 576), (1536, 576), (576, 1536)):
        spec = QuantSpec(4, 64, False)
        r = rtn_quantize(torch.randn(n, k), spec)
        module = PackedLinear.from_codes(r.codes, r.scales, r.zeros, spec, None)
        w = cpu_plan(module).segments[0].payload
        dense = shift_dequantizer(module)
        for m in (1, 16, 64, 128, 256, 512):
            x = torch.randn(m, k, dtype=bf16)
            a = timed(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.packed, w.group, w.scale_zero), args.repeats)
            b = timed(lambda: torch.nn.functional.linear(x, dense()), args.repeats)
            lines.append(f"| {n} × {k} | {m} | {a:.3f} | {b:.3f} |")
    lines += ["", "2. Grouped 8-bit (g64), ms per call: the library keeps a dense bf16 copy.", "",
              "| N × K | M | dense bf16 copy | int8 op per group | dequantize per call |", "|---|---|---|---|---|"]
    for n, k in ((1536, 576), (576, 1536)):
        g, groups = 64, k // 64
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        s = torch.rand(n, groups).to(bf16)
        wb = (q.float().view(n, groups, g) * s.float()[..., None]).view(n, k).to(bf16)
        qs = [q[:, i * g:(i + 1) * g].contiguous() for i in range(groups)]
        ss = [s[:, i].contiguous() for i in range(groups)]
        for m in (1, 512):
            x = torch.randn(m, k, dtype=bf16)
            xs = [x[:, i * g:(i + 1) * g].contiguous() for i in range(groups)]

            def per_group():
                y = torch.ops.aten._weight_int8pack_mm(xs[0], qs[0], ss[0]).float()
                for i in range(1, groups):
                    y += torch.ops.aten._weight_int8pack_mm(xs[i], qs[i], ss[i])
                return y

            dense_ms = timed(lambda: x @ wb.T, args.repeats)
            group_ms = timed(per_group, max(5, args.repeats // 4))
            deq_ms = timed(lambda: torch.nn.functional.linear(
                x, (q.view(n, groups, g).to(bf16) * s[..., None]).view(n, k)), max(5, args.repeats // 4))
            lines.append(f"| {n} × {k} | {m} | {dense_ms:.3f} | {group_ms:.3f} | {deq_ms:.3f} |")
    lines += ["", "3. `_weight_int8pack_mm` relative error without padding (32 rows, 3 inputs; K = 33 crashed the "
              "process in an earlier check and is not run):", "", "| K | relative error |", "|---|---|"]
    for k in (40, 48, 64, 72, 80):
        q = torch.randint(-128, 128, (32, k), dtype=torch.int8)
        s = torch.rand(32).to(bf16)
        x = torch.randn(3, k).to(bf16)
        y = torch.ops.aten._weight_int8pack_mm(x, q, s).float()
        ref = x.float() @ (q.float() * s.float()[:, None]).T
        lines.append(f"| {k} | {float((y - ref).abs().max() / ref.abs().max()):.3g} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(TITLE, text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
