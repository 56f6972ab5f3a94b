"""Serving export: SmolLM2 packed checkpoints → compressed-tensors, GPTQ and GGUF, each read back by a reader.

    python benchmarks/export.py [--windows 20] [--formats compressed-tensors,gptq,gguf]

Rows: the GPTQ 4-bit / 3-bit g64 and BAQ mixed checkpoints that ``benchmarks/inference_speed.py`` builds (built
here if missing). Per row and format: export time, file bytes, what was widened, max and mean |Δlogit| of the
reader's model (dequantized to fp32) against our checkpoint (reference numerics) on 8 WikiText-2 test windows of
512 tokens, and perplexity of both on ``--windows`` test windows. Readers: compressed-tensors — transformers'
integration (``from_pretrained(dir)``); GPTQ — the independent reader of ``tests/gptq_reader.py`` (GPTQModel needs a
newer torch than this machine's; it is checked on tiny models in the tests when present); GGUF — transformers'
GGUF loader. compressed-tensors is exported vLLM-servable (``servable="widen"``); what cannot be held exactly is
widened (``widen=True``). Writes "## Serving export" in RESULTS.md.
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

TITLE = "## Serving export"
ROWS = ("GPTQ 4-bit", "GPTQ 3-bit", "BAQ mixed 2-4 bit (avg 3)")
FORMATS = ("compressed-tensors", "gptq", "gguf")


def read_back(fmt: str, path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    if fmt == "gguf":
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    if fmt == "gptq":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from gptq_reader import dense_model

        return dense_model(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def written(report: dict) -> str:
    if report["format"] == "gguf":
        from collections import Counter

        return ", ".join(f"{t} {n}" for t, n in Counter(report["types"].values()).most_common())
    counts = report["written"]["counts"]
    text = ", ".join(f"{s} {n}" for s, n in sorted(counts.items()))
    if report["format"] == "gptq":
        text += f" ({report['checkpoint_format']}, {len(report['dynamic'])} dynamic)"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--formats", default=",".join(FORMATS))
    args = parser.parse_args()
    formats = args.formats.split(",")
    import json

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_compress
    from hf_compress.calibration.data import default_text_source, load_text, tokenize_text
    from hf_compress.evaluation import eval_windows, perplexity
    from inference_speed import build_packed

    try:
        import compressed_tensors

        ct_version = compressed_tensors.__version__
    except ImportError:
        ct_version = "not installed"
    test = default_text_source("test")
    lines = [TITLE, "", f"Command: `python benchmarks/export.py --windows {args.windows}` · machine: "
             f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU · hf-compress {hf_compress.__version__}, torch "
             f"{torch.__version__}, transformers {transformers.__version__}, compressed-tensors {ct_version} · date: "
             f"{datetime.date.today().isoformat()}",
             "", "SmolLM2-135M-Instruct checkpoints (g64, bf16 dense parts) exported with `hf_compress.export(..., "
             "format=...)`: compressed-tensors vLLM-servable (`servable=\"widen\"`: 3-bit asymmetric codes go to vLLM's "
             "4-bit asymmetric grid, per-column mixed modules dense), GPTQ and GGUF with `widen=True` (what has no exact "
             "place is written wider or dense). Read back by transformers' compressed-tensors integration, the "
             "independent GPTQ reader of `tests/gptq_reader.py`, and transformers' GGUF loader, all dequantized to fp32. "
             "|Δlogit| against our checkpoint (`HF_COMPRESS_KERNELS=reference`) on 8 WikiText-2 test windows of 512 "
             f"tokens; perplexity on {args.windows} test windows of 512.", "",
             "| checkpoint | format | written | file MB | ours MB | export s | max |Δlogit| | mean |Δlogit| | ppl ours | ppl reader |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    out_root = Path(tempfile.mkdtemp(prefix="hfc-export-"))
    for row in ROWS:
        folder = build_packed(row, 16)
        ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        windows = eval_windows(tokenize_text(load_text(test), tok), 512, 8)
        ppl_ours = perplexity(ours, tok, test, 512, args.windows, progress=False)
        with torch.no_grad():
            expected = [ours(w[None]).logits for w in windows]
        ours_mb = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 2**20
        for fmt in formats:
            t = time.perf_counter()
            try:
                path = hf_compress.export(ours, out_root / f"{row.replace(' ', '_')}-{fmt}", format=fmt, tokenizer=tok,
                                          widen=True, servable="widen")
            except ValueError as exc:  # the format holds nothing of this plan: a row saying so
                lines.append(f"| {row} | {fmt} | refused: {str(exc).split(';')[0]} | — | {ours_mb:.1f} | — | — | — | "
                             f"{ppl_ours:.3f} | — |")
                print(lines[-1], flush=True)
                continue
            seconds = time.perf_counter() - t
            export_dir = path.parent if fmt == "gguf" else path
            report = json.loads((export_dir / "hf_compress_export.json").read_text())
            theirs = read_back(fmt, path)
            max_d, mean_d = 0.0, []
            with torch.no_grad():
                for w, a in zip(windows, expected):
                    b = theirs(w[None]).logits
                    max_d = max(max_d, float((a - b).abs().max()))
                    mean_d.append(float((a - b).abs().mean()))
            ppl_theirs = perplexity(theirs, tok, test, 512, args.windows, progress=False)
            lines.append(f"| {row} | {fmt} | {written(report)} | {report['file_bytes'] / 2**20:.1f} | {ours_mb:.1f} | "
                         f"{seconds:.1f} | {max_d:.4f} | {sum(mean_d) / len(mean_d):.5f} | {ppl_ours:.3f} | {ppl_theirs:.3f} |")
            print(lines[-1], flush=True)
            del theirs
        text = "\n".join(lines) + "\n"
        write_section(TITLE, text)  # partial results survive an interrupted run
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
