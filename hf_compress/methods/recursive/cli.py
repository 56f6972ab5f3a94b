"""``hf-compress recursive``: convert a Llama-family model into a Relaxed Recursive Transformer and save it.

    hf-compress recursive [MODEL] --out OUT [--loops 2] [--scheme cycle|sequence] [--init stepwise|average|lower]
                          [--untie-norms] [--early-exit-loss-weight W [--no-early-exit-distill]]
                          [--early-exit-threshold T]
                          [--relax-rank R|full [--relax-init svd|zero] [--freeze-shared]]
                          [--uptrain-steps N --dataset TEXT [--distill-weight 1.0 --temperature 1.0]
                           --lr --batch-size --seq-len --warmup-steps --weight-decay --seed]
                          [--dtype] [--overwrite]

Every option of :func:`~hf_compress.methods.recursive.conversion.convert` is a flag (same defaults), plus the
recursive config's early-exit settings. ``--relax-rank`` wraps the result in relaxed recursive LoRA (one LoRA per
unrolled position, SVD-initialised from the original layers) and saves it as the recursive base in OUT plus the
adapter in ``OUT/relaxed_lora``. ``--uptrain-steps`` uptrains (all parameters) with
:class:`~hf_compress.methods.recursive.uptraining.RecursiveUptrainer`, distilling the original model (forward KL)
unless ``--distill-weight 0``.
"""

from __future__ import annotations

import argparse

from hf_compress.cli.common import add_model_command
from hf_compress.cli.training import (add_training_args, as_dataset, card_base_model, check_training_args,
                                          training_arguments, training_windows)
from hf_compress.methods.recursive.sharing import INITS, SCHEMES


def _rank(value: str):
    if value == "full":
        return value
    try:
        rank = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'full', got {value!r}") from None
    if rank < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'full', got {value!r}")
    return rank


def add_command(sub) -> None:

    p = add_model_command(sub, "recursive", help="convert MODEL into a (relaxed) recursive transformer and save it",
                          description="Tie the decoder layers of a Llama-family MODEL into --loops loops of shared "
                                   "blocks (Relaxed Recursive Transformers, Bae et al. 2024); optionally add "
                                   "relaxed per-position LoRA and uptrain; save to --out.",
                          out_help="folder for the recursive model")
    g = p.add_argument_group("conversion (convert())")
    g.add_argument("--loops", type=int, default=2,
                   help="B, times the shared stack runs; must divide the number of layers (default: 2)")
    g.add_argument("--scheme", choices=SCHEMES, default="cycle",
                   help="cycle repeats the whole stack (0,1,0,1), sequence each block in place (0,0,1,1) (default: cycle)")
    g.add_argument("--init", choices=INITS, default="stepwise",
                   help="shared weights from: stepwise every B-th layer incl. first and last, average the mean of "
                        "the layers a block replaces, lower the first L/B layers (default: stepwise)")
    g.add_argument("--untie-norms", action="store_true",
                   help="keep every position's own RMSNorm gains (the paper ties them; untied lets a full-rank "
                        "relaxed LoRA reproduce the original exactly)")
    g = p.add_argument_group("early exit (stored in the config)")
    g.add_argument("--early-exit-loss-weight", type=float, default=0.0,
                   help="weight of the loss at every earlier loop's exit during uptraining (0: off; needs "
                        "--scheme cycle; default: 0)")
    g.add_argument("--early-exit-distill", action=argparse.BooleanOptionalAction, default=True,
                   help="add KL from the final loop to each early-exit loss (default: on)")
    g.add_argument("--early-exit-threshold", type=float, default=None,
                   help="confidence in (0, 1] at which early-exit generation stops looping (default: none)")
    g = p.add_argument_group("relaxed recursive LoRA (relax())")
    g.add_argument("--relax-rank", type=_rank, default=None,
                   help="add one LoRA of this rank (or 'full') per unrolled position; saved to OUT/relaxed_lora")
    g.add_argument("--relax-init", choices=("svd", "zero"), default="svd",
                   help="svd: truncated SVD of (original - shared) weights; zero: start at the pure recursive "
                        "model (default: svd)")
    g.add_argument("--freeze-shared", action="store_true",
                   help="train only the LoRA during uptraining (the paper also trains the shared weights)")
    add_training_args(p, steps_flag="--uptrain-steps", steps_default=0, lr=1e-4, dataset_required=False)
    g = p.add_argument_group("distillation (RecursiveUptrainer)")
    g.add_argument("--distill-weight", type=float, default=1.0,
                   help="weight of forward KL from the original model during uptraining (0: no teacher; default: 1)")
    g.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default: 1)")
    p.set_defaults(handler=run)


def _check_args(args) -> None:
    if args.loops < 1:
        raise ValueError(f"--loops must be a positive integer, got {args.loops}")
    if args.early_exit_loss_weight < 0:
        raise ValueError(f"--early-exit-loss-weight must be >= 0, got {args.early_exit_loss_weight}")
    if args.early_exit_loss_weight > 0:
        if args.scheme != "cycle":
            raise ValueError("--early-exit-loss-weight needs --scheme cycle: with 'sequence' no prefix of the "
                             "unrolled stack is a complete pass over the shared blocks")
    if args.early_exit_threshold is not None and not 0 < args.early_exit_threshold <= 1:
        raise ValueError(f"--early-exit-threshold must lie in (0, 1], got {args.early_exit_threshold}")
    if args.steps < 0:
        raise ValueError(f"--uptrain-steps must be >= 0, got {args.steps}")
    if args.steps:
        check_training_args(args, "--uptrain-steps")
        if args.distill_weight < 0 or args.temperature <= 0:
            raise ValueError("--distill-weight must be >= 0 and --temperature > 0")
    elif args.dataset:
        raise ValueError("--dataset is only used for uptraining: add --uptrain-steps N")
    if args.relax_rank is None and (args.freeze_shared or args.relax_init != "svd"):
        raise ValueError("--relax-init / --freeze-shared apply to relaxed LoRA: add --relax-rank R")


def _save(args, model, tokenizer, base_model) -> None:
    """Atomic save with the model card (and the tokenizer); a relaxed model is the recursive base in OUT plus its
    adapter in OUT/relaxed_lora, written by ``save_relaxed`` inside the same atomic folder."""
    import os
    import shutil
    from pathlib import Path

    from hf_compress.checkpoint.atomic import atomic_directory
    from hf_compress.integrations.hub import save_pretrained

    if args.relax_rank is None:
        save_pretrained(model, args.out, tokenizer=tokenizer, base_model=base_model, overwrite=args.overwrite)
        return
    from hf_compress.methods.recursive.relaxed_lora import save_relaxed

    out = Path(args.out)
    with atomic_directory(out, overwrite=args.overwrite) as tmp:
        inner = tmp / out.name  # named like OUT, so the card's repo id is OUT's name
        save_relaxed(model, inner, base_model_name_or_path=os.fspath(out.resolve()))
        for entry in inner.iterdir():
            shutil.move(str(entry), tmp / entry.name)
        inner.rmdir()
        tokenizer.save_pretrained(tmp)


def run(args) -> dict:
    import math
    import tempfile

    from hf_compress.cli.common import check_out, load_model_arg
    from hf_compress.methods.recursive.conversion import check_convertible, convert

    _check_args(args)
    check_out(args)
    original, tokenizer = load_model_arg(args.model, args.dtype)
    check_convertible(original)
    layers = original.config.num_hidden_layers
    model = convert(original, num_loops=args.loops, scheme=args.scheme, init=args.init, tie_norms=not args.untie_norms)
    model.config.early_exit_loss_weight = float(args.early_exit_loss_weight)
    model.config.early_exit_distill = bool(args.early_exit_distill)
    model.config.early_exit_threshold = args.early_exit_threshold
    if args.relax_rank is not None:
        from hf_compress.methods.recursive.relaxed_lora import relax

        model = relax(model, original if args.relax_init == "svd" else None, ranks=args.relax_rank,
                      init=args.relax_init, train_shared_weights=not args.freeze_shared)
    loss = None
    if args.steps:
        from hf_compress.methods.recursive.uptraining import RecursiveUptrainer

        windows = training_windows(args, tokenizer)
        teacher = original if args.distill_weight > 0 else None
        with tempfile.TemporaryDirectory(prefix="hfc-recursive-") as tmp:
            trainer = RecursiveUptrainer(model=model, args=training_arguments(args, tmp),
                                         train_dataset=as_dataset(windows), teacher=teacher,
                                         distill_weight=args.distill_weight, temperature=args.temperature)
            loss = trainer.train().training_loss
        if not math.isfinite(loss):
            raise ValueError(f"uptraining diverged (loss {loss}); lower --lr")
    model.eval()
    from hf_compress.methods.recursive.relaxed_lora import _is_main_process

    if _is_main_process():  # under torchrun every rank holds the same model; two ranks staging OUT would race
        _save(args, model, tokenizer, card_base_model(args, original))
    unique = layers // args.loops
    params = sum(p.numel() for p in model.parameters())
    dense = sum(p.numel() for p in original.parameters())
    result = {"out": args.out, "num_layers": layers, "num_loops": args.loops, "unique_layers": unique,
              "scheme": args.scheme, "init": args.init, "params": params, "dense_params": dense,
              "relax_rank": args.relax_rank, "uptrain_steps": args.steps, "training_loss": loss}
    extra = "" if args.relax_rank is None else f", relaxed LoRA rank {args.relax_rank} (OUT/relaxed_lora)"
    extra += "" if loss is None else f", uptrained {args.steps} steps (loss {loss:.4f})"
    print(f"recursive: {layers} layers -> {unique} unique blocks x {args.loops} loops ({args.scheme}, {args.init} "
          f"init), {params:,} parameters (dense {dense:,}){extra}; saved {args.out}")
    return result
