"""Which kernel serves each packed module, and why a module fell back: what a user checks when a model is slow."""

from __future__ import annotations

from hf_compress.formats.linear import PackedLinear
from hf_compress.kernels.dispatch import cpu_plan, kernel_mode


def kernel_report(model) -> list[dict]:
    """Per packed module: the kernel that serves it on its device now, and why a segment fell back.

    CPU plans are built here if no forward built them yet (the same plan the forward then uses)."""
    mode, rows = kernel_mode(), []
    for name, module in model.named_modules():
        describe = getattr(module, "kernel_description", None)  # other stored modules say how they run
        if describe is not None and not isinstance(module, PackedLinear):
            kinds, reasons = describe()
            rows.append({"module": name, "device": next(module.buffers()).device.type, "kernels": kinds,
                         "fallback": reasons})
            continue
        if not isinstance(module, PackedLinear):
            continue
        device = module.weight.device.type
        if type(module).__name__ == "PackedEmbedding":
            kinds, reasons = ["row lookup"], []
        elif mode == "reference":
            kinds, reasons = ["reference"], ["HF_COMPRESS_KERNELS=reference"]
        elif device == "cuda":
            kinds, reasons = ["triton fused (decode) / dequantize + cuBLAS (prefill)"], []
        elif device == "cpu":
            plan = cpu_plan(module)
            kinds, reasons = plan.kinds, plan.fallback_reasons
        else:
            kinds, reasons = ["reference"], [f"no fast path on {device}"]
        rows.append({"module": name, "device": device, "kernels": kinds, "fallback": reasons})
    return rows


def format_kernel_report(rows: list[dict]) -> str:
    """One summary line (modules per kernel) plus one line per module that fell back."""
    from collections import Counter

    counts = Counter("+".join(r["kernels"]) for r in rows)
    lines = ["kernels: " + ", ".join(f"{k} × {n}" for k, n in counts.most_common())]
    lines += [f"  {r['module']}: {'; '.join(r['fallback'])}" for r in rows if r["fallback"]]
    return "\n".join(lines)
