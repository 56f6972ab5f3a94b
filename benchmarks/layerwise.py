"""Layer-wise Quantization on SmolLM2-135M: LIM vs ZD vs random ordering at the same realised bits.

Half of the 30 decoder layers at 2 bits, half at 4 (GPTQ, group 64) — the same realised bits as uniform
3-bit GPTQ (3.297 bits/weight), so the uniform row of the quantization section is the baseline. Protocol as in
benchmarks/quantization.py. Each row runs in its own process.

    python benchmarks/layerwise.py
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402
from quantization import _setup, versions  # noqa: E402  (shared protocol set-up)

TITLE = "## Layer-wise Quantization on SmolLM2-135M-Instruct (half the layers 4-bit, half 2-bit, GPTQ g64)"
SCORES = ["lim", "zd", "random"]


def run_row(score: str) -> dict:
    import hf_compress
    from hf_compress.calibration.data import default_text_source
    from hf_compress.evaluation import perplexity
    from hf_compress.report import size_report

    model, tok, calib = _setup()
    config = hf_compress.LayerwiseQuantConfig(score=score, high_bits=4, low_bits=2, low_fraction=0.5, group_size=64)
    t = time.perf_counter()
    hf_compress.quantize(model, config, calibration=calib, tokenizer=tok)
    seconds = time.perf_counter() - t
    return {"score": score, "perplexity": round(perplexity(model, tok, default_text_source("test"), 512, 40), 3),
            "bits_per_weight": round(size_report(model).bits_per_weight, 3), "quantize_s": round(seconds, 1),
            "low_layers": [i for i, b in enumerate(config.layer_bits) if b == 2]}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--row":
        print("RESULT " + json.dumps(run_row(sys.argv[2])), flush=True)
        return
    rows = []
    for score in SCORES:
        proc = subprocess.run([sys.executable, __file__, "--row", score], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"row {score} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(line[7:]))
        print(rows[-1], flush=True)
    lines = [TITLE, "",
             f"Command: `python benchmarks/layerwise.py` · machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU · "
             f"{versions()} · date: {datetime.date.today().isoformat()}", "",
             "Ordering decides which 15 layers go to 2 bits (the least important by the score; ZD read as higher = more "
             "important; random uses seed 0). Baseline at the same realised bits: uniform GPTQ 3-bit g64 in the section above.", "",
             "| ordering | perplexity | bits/weight | quantize time (s) | layers at 2 bits |", "|---|---|---|---|---|"]
    lines += [f"| {r['score']} | {r['perplexity']} | {r['bits_per_weight']} | {r['quantize_s']} | {r['low_layers']} |" for r in rows]
    write_section(TITLE, "\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
