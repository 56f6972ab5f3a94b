"""Sensitivity profile of SmolLM2-135M-Instruct → a section of benchmarks/RESULTS.md and a PNG beside it.

    python benchmarks/sensitivity.py                     # measures (same as `hf-compress profile --out DIR`)
    python benchmarks/sensitivity.py --profile DIR       # renders a profile that command already measured

Calibration: 32 × 512 tokens of WikiText-2 valid (seed 0); reference grid 3-bit, group 64; Fisher from 8 windows.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import tempfile
from pathlib import Path

from _results import write_section

HERE = Path(__file__).resolve().parent
TITLE = "## Sensitivity profile of SmolLM2-135M-Instruct"


def measure(out: Path) -> None:
    import torch

    from hf_compress.calibration.data import CalibrationSpec, default_text_source
    from hf_compress.models import load_model
    from hf_compress.sensitivity import profile

    torch.set_num_threads(2)
    model, tok = load_model()
    calib = CalibrationSpec(default_text_source("validation"), 32, 512, 0)
    profile(model, calib, tok, bits=3, group_size=64, fisher_samples=8).save(out)


def render(profile_dir: Path) -> None:
    import torch
    import transformers

    import hf_compress
    from hf_compress.sensitivity import SensitivityProfile

    prof = SensitivityProfile.load(profile_dir)
    prof.plot(HERE / "smollm2_sensitivity.png")
    section = "\n".join([
        TITLE, "",
        f"Command: `python benchmarks/sensitivity.py` (equivalently `hf-compress profile --out DIR`) · machine: "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU · hf-compress {hf_compress.__version__}, torch "
        f"{torch.__version__}, transformers {transformers.__version__} · date: {datetime.date.today().isoformat()}", "",
        "Calibration 32 × 512 tokens of WikiText-2 valid (seed 0); GPTQ loss and Fisher estimate at 3-bit, group 64; "
        "Fisher diagonal from 8 windows. Plot: `benchmarks/smollm2_sensitivity.png`.", "",
        prof.table(), "",
    ])
    write_section(TITLE, section)

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", type=Path, default=None, help="folder holding sensitivity_profile.json")
    args = ap.parse_args()
    if args.profile is not None:
        render(args.profile)
        return
    tmp = Path(tempfile.mkdtemp())
    try:
        measure(tmp)
        render(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
