"""Serving export: SmolLM2 packed checkpoints → GGUF, read back by transformers' GGUF loader.

    python benchmarks/export.py [--windows 20]

Rows: the GPTQ 4-bit / 3-bit g64 and BAQ mixed checkpoints that ``benchmarks/inference_speed.py`` builds (built
here if missing). Per row: export time, file bytes, max and mean |Δlogit| of the GGUF model (transformers'
reader, dequantized to fp32) against our checkpoint (reference numerics) on 8 WikiText-2 test windows of 512
tokens, and perplexity of both on ``--windows`` test windows. Writes "## Serving export (GGUF)" in RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_COMPRESS_KERNELS", "reference")  # our side of the comparison: the exact numerics

from _results import write_section

TITLE = "## Serving export (GGUF)"
ROWS = ("GPTQ 4-bit", "GPTQ 3-bit", "BAQ mixed 2-4 bit (avg 3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20)
    args = parser.parse_args()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_compress
    from hf_compress.calibration.data import default_text_source, load_text, tokenize_text
    from hf_compress.evaluation import eval_windows, perplexity
    from inference_speed import build_packed

    test = default_text_source("test")
    lines = [TITLE, "", f"Command: `python benchmarks/export.py --windows {args.windows}` · machine: "
             f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU · hf-compress {hf_compress.__version__}, torch "
             f"{torch.__version__}, transformers {transformers.__version__} · date: {datetime.date.today().isoformat()}",
             "", "SmolLM2-135M-Instruct checkpoints (g64, bf16 dense parts) exported with `hf_compress.export(..., "
             "format=\"gguf\")` (BAQ's per-column widths have no ggml block type: `widen=True`, those modules F16); the "
             "GGUF read back with `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` (dequantized to fp32). "
             "|Δlogit| against our checkpoint (`HF_COMPRESS_KERNELS=reference`) on 8 WikiText-2 test windows of 512 "
             f"tokens; perplexity on {args.windows} test windows of 512.", "",
             "| checkpoint | GGUF types | file MB | ours MB | export s | max |Δlogit| | mean |Δlogit| | ppl ours | ppl GGUF |",
             "|---|---|---|---|---|---|---|---|---|"]
    out_root = Path(tempfile.mkdtemp(prefix="hfc-export-"))
    for row in ROWS:
        folder = build_packed(row, 16)
        ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        t = time.perf_counter()
        path = hf_compress.export(ours, out_root / row.replace(" ", "_"), tokenizer=tok, widen=row.startswith("BAQ"))
        seconds = time.perf_counter() - t
        theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        windows = eval_windows(tokenize_text(load_text(test), tok), 512, 8)
        max_d, mean_d = 0.0, []
        with torch.no_grad():
            for w in windows:
                a, b = ours(w[None]).logits, theirs(w[None]).logits
                max_d = max(max_d, float((a - b).abs().max()))
                mean_d.append(float((a - b).abs().mean()))
        ppl_ours = perplexity(ours, tok, test, 512, args.windows, progress=False)
        ppl_theirs = perplexity(theirs, tok, test, 512, args.windows, progress=False)
        import json

        report = json.loads((path.parent / "hf_compress_export.json").read_text())
        from collections import Counter

        types = ", ".join(f"{t} {n}" for t, n in Counter(report["types"].values()).most_common())
        ours_mb = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 2**20
        lines.append(f"| {row} | {types} | {path.stat().st_size / 2**20:.1f} | {ours_mb:.1f} | {seconds:.1f} | "
                     f"{max_d:.4f} | {sum(mean_d) / len(mean_d):.5f} | {ppl_ours:.3f} | {ppl_theirs:.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(TITLE, text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
