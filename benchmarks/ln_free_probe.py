"""Why SmolLM2's RMSNorms cannot all be frozen at once: forward-only probes, no training.

On the first 4 × 128 WikiText-2 valid tokens (the LN-free row's first batch): the residual stream's RMS at position 0
against the other positions, and what happens to the largest residual when MLP-input norms are frozen at their
average σ (``estimate_std`` + ``remove``) without any fine-tuning — with one σ for all positions, and with the
position-0 σ. Writes the "## LayerNorm-free: SmolLM2 forward probes" section of RESULTS.md.

    python benchmarks/ln_free_probe.py
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402
from quantization import versions  # noqa: E402

TITLE = "## LayerNorm-free: SmolLM2 forward probes"
SEQ, BATCH = 128, 4
PROBES = {  # name -> (position-0 σ, decoder layers whose MLP-input norm is frozen)
    "one σ, MLP norms of layers 0-6": (False, range(0, 7)),
    "position-0 σ, MLP norms of layers 10-29": (True, range(10, 30)),
    "position-0 σ, MLP norms of layers 0-9": (True, range(0, 10)),
}


def rms(x):
    return x.float().pow(2).mean(-1).sqrt()


def main() -> None:
    import torch

    from hf_compress.calibration.data import default_text_source, load_text, tokenize_text
    from hf_compress.methods.ln_free import estimate_std, make_removable
    from hf_compress.methods.ln_free.swap import remove
    from hf_compress.models import load_model

    torch.manual_seed(0)
    model, tok = load_model()
    ids = tokenize_text(load_text(default_text_source("validation")), tok)
    n = ids.numel() // SEQ
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    batch = ids[: n * SEQ].view(n, SEQ)[order][:BATCH]

    with torch.no_grad():
        hidden = model(input_ids=batch, labels=batch, output_hidden_states=True)
    pos0 = [rms(h[:, 0]).mean().item() for h in hidden.hidden_states[1:]]
    rest = [rms(h[:, 1:]).mean().item() for h in hidden.hidden_states[1:]]
    ratio = max(a / b for a, b in zip(pos0, rest))
    lines = [TITLE, "",
             f"Command: `python benchmarks/ln_free_probe.py` · machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"no GPU · {versions()} · date: {datetime.date.today().isoformat()}", "",
             f"SmolLM2-135M-Instruct (fp32), the first {BATCH} × {SEQ} WikiText-2 valid tokens of the LN-free row's "
             "seeded order; no training. Residual RMS = root mean square over the hidden size of each decoder layer's "
             "output.", "",
             f"- Original model, loss {hidden.loss.item():.3f}: position-0 residual RMS {min(pos0):.0f}–{max(pos0):.0f} "
             f"across layers, other positions (mean) {min(rest):.1f}–{max(rest):.1f}; largest ratio {ratio:.0f}×.",
             "", "| probe | loss | largest residual RMS after each frozen layer (position 0 excluded with its own σ) |",
             "|---|---|---|"]
    del model
    for name, (position0, layers) in PROBES.items():
        model, _ = load_model()
        make_removable(model, position0=position0)
        estimate_std(model, [batch])
        for i in layers:
            remove(model, f"ln_2.{i}")
        with torch.no_grad():
            out = model(input_ids=batch, labels=batch, output_hidden_states=True)
        start = 0 if not position0 else 1
        peaks = [rms(out.hidden_states[i + 1][:, start:]).max().item() for i in layers]
        shown = ", ".join(f"{p:.2g}" for p in peaks[:8]) + (", …" if len(peaks) > 8 else "")
        lines.append(f"| {name} | {out.loss.item():.3f} | {shown} |")
        del model
    write_section(TITLE, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
