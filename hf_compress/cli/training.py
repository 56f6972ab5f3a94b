"""Flags and Trainer setup that the training methods' commands share: flags generated
from a config dataclass (so no field is forgotten), the common training flags, token windows from
``hf_compress.calibration.data`` and the ``TrainingArguments`` they all use. Nothing heavy is imported at module
level (``--help`` stays instant)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing

# -- flags generated from a config dataclass ------------------------------------------------------------------------


def _doc_args(cls) -> dict[str, str]:
    """``{field: help}`` from the ``Args:`` section of ``cls``'s docstring (``a, b: text`` names several)."""
    doc = (cls.__doc__ or "").split("Args:", 1)
    if len(doc) < 2:
        return {}
    helps: dict[str, str] = {}
    current: list[str] = []
    for line in doc[1].splitlines():
        m = re.match(r"^\s*([a-z_][a-z0-9_]*(?:\s*,\s*[a-z_][a-z0-9_]*)*):\s+(.*)$", line)
        if m:
            current = [n.strip() for n in m.group(1).split(",")]
            for n in current:
                helps[n] = m.group(2).strip()
        elif line.strip() and current:
            for n in current:
                helps[n] += " " + line.strip()
    return {k: v.replace("``", "").replace("%", "%%") for k, v in helps.items()}


def _field_type(hint) -> type:
    """``int | None`` -> int; ``bool`` -> bool; plain types unchanged."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"cannot make a flag for a field of type {hint}")
        hint = args[0]
    if hint not in (int, float, str, bool):
        raise TypeError(f"cannot make a flag for a field of type {hint}")
    return hint


def add_dataclass_args(parser, cls, dest_prefix: str, rename: dict[str, str] | None = None,
                       title: str | None = None) -> None:
    """One flag per field of the dataclass ``cls`` (``--field-name``; booleans get ``--no-...`` too), stored as
    ``args.<dest_prefix><field>``; help comes from the class docstring's ``Args:`` section."""
    hints = typing.get_type_hints(cls)
    helps = _doc_args(cls)
    group = parser.add_argument_group(title or f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = _field_type(hints[f.name])
        flag = "--" + (rename or {}).get(f.name, f.name).replace("_", "-")
        help_text = f"{helps.get(f.name, cls.__name__ + '.' + f.name)} (default: {default})"
        if kind is bool:
            group.add_argument(flag, dest=dest_prefix + f.name, action=argparse.BooleanOptionalAction,
                               default=default, help=help_text)
        else:
            group.add_argument(flag, dest=dest_prefix + f.name, type=kind, default=default,
                               metavar=kind.__name__.upper(), help=help_text)


def dataclass_from_args(cls, args, dest_prefix: str, **override):
    """Build ``cls`` from the flags :func:`add_dataclass_args` added (its own validation raises ValueError)."""
    values = {f.name: getattr(args, dest_prefix + f.name) for f in dataclasses.fields(cls)}
    return cls(**{**values, **override})


# -- the training flags and the Trainer setup shared by the training methods ----------------------------------


def add_training_args(p, *, steps_flag: str = "--steps", steps_default: int | None = None, lr: float = 1e-4,
                      dataset_required: bool = True) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--dataset", required=dataset_required, default=None,
                   help="training text: a text file, or a datasets spec 'name:config:split'")
    g.add_argument(steps_flag, dest="steps", type=int, required=steps_default is None, default=steps_default,
                   help="optimizer steps" + ("" if steps_default is None else f" (default: {steps_default})"))
    g.add_argument("--lr", type=float, default=lr, help=f"learning rate (default: {lr:g})")
    g.add_argument("--batch-size", type=int, default=8, help="windows per optimizer step (default: 8)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per training window (default: 512)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default: 0)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    g.add_argument("--seed", type=int, default=0, help="seeds the windows and the Trainer (default: 0)")


def check_training_args(args, steps_name: str = "--steps") -> None:
    """Plain ValueErrors for bad training flags, before the model is loaded."""
    if args.steps is None or args.steps < 1:
        raise ValueError(f"{steps_name} must be a positive integer, got {args.steps}")
    if not args.dataset:
        raise ValueError("--dataset is required for training: a text file or a datasets spec 'name:config:split'")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.warmup_steps < 0 or args.weight_decay < 0:
        raise ValueError("--warmup-steps and --weight-decay must be >= 0")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.dataset and os.path.sep in args.dataset and not os.path.isfile(args.dataset):
        raise FileNotFoundError(f"--dataset file not found: {args.dataset}")


def training_windows(args, tokenizer):
    """``[steps * batch_size, seq_len]`` seeded token windows of ``--dataset`` (the calibration protocol)."""
    from hf_compress.calibration.data import CalibrationSpec, calibration_batches

    spec = CalibrationSpec(args.dataset, num_samples=args.steps * args.batch_size, seq_len=args.seq_len, seed=args.seed)
    return calibration_batches(spec, tokenizer)


def as_dataset(windows) -> list[dict]:
    return [{"input_ids": row, "labels": row} for row in windows]


def training_arguments(args, output_dir):
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, seed=args.seed,
        report_to=[], save_strategy="no", logging_strategy="steps", logging_steps=max(1, args.steps // 10),
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), disable_tqdm=False,
    )


def card_base_model(args, model) -> str | None:
    """The Hub id the result was made from, for its card (a local folder or file is none)."""
    inputs = getattr(model, "hfc_card_inputs", None) or {}
    if inputs.get("base_model"):
        return inputs["base_model"]
    if args.model and not os.path.exists(args.model) and not str(args.model).endswith(".gguf"):
        return args.model
    return None
