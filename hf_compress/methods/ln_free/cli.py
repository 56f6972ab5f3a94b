"""``hf-compress ln-free``: remove every LayerNorm/RMSNorm by fine-tuning on a schedule, then export.

    hf-compress ln-free [MODEL] --out OUT --dataset TEXT --steps N
                        [--start 50 --gap-ln2 10 --gap-ln1qk 15 --gap-ln1v 15 --gap-ln-f 15 --start-ln1qk S
                         --start-ln1v S --layers-per-step 1 --gap-pos0 G]   (every LNRemovalSchedule field)
                        [--position0] [--aux-loss-weight 0.1] [--export structural|compatible]
                        [--lr --batch-size --seq-len --warmup-steps --weight-decay --seed] [--dtype] [--overwrite]

The schedule, the export form and the model are checked before training starts (a schedule that does not finish
within --steps, a compatible export of a non-GPT-2 model or of a model that keeps its position-0 σ, float16 with
the compatible export). See docs/ln-free.md.
"""

from __future__ import annotations

from hf_compress.cli.common import add_model_command
from hf_compress.cli.training import (add_dataclass_args, add_training_args, as_dataset, card_base_model,
                                          check_training_args, dataclass_from_args, training_arguments,
                                          training_windows)

EXPORTS = ("structural", "compatible")


def add_command(sub) -> None:
    from hf_compress.methods.ln_free.schedule import LNRemovalSchedule

    p = add_model_command(sub, "ln-free", help="remove every norm of MODEL by fine-tuning, then export an LN-free model",
                          description="Fine-tune MODEL (GPT-2 or Llama family) while its norms are removed one layer at "
                                      "a time on the LNRemovalSchedule, then export the LN-free model to --out.",
                          out_help="folder for the exported LN-free model")
    add_training_args(p, lr=6e-4)
    add_dataclass_args(p, LNRemovalSchedule, "schedule_", title="removal schedule (LNRemovalSchedule; 0-based steps)")
    g = p.add_argument_group("LN-free")
    g.add_argument("--position0", action="store_true",
                   help="give position 0 its own σ in every norm (attention-sink models such as SmolLM2); "
                        "--gap-pos0 collapses it at the end, which --export compatible needs")
    g.add_argument("--aux-loss-weight", type=float, default=0.1,
                   help="weight of the uniform-residual-norm auxiliary loss (0: off; default: 0.1)")
    g.add_argument("--export", choices=EXPORTS, default="structural",
                   help="structural: registered hfc_ln_free_* architecture (exact, any dtype); compatible: a plain "
                        "GPT2LMHeadModel (GPT-2 only, fp32/bf16) (default: structural)")
    p.set_defaults(handler=run)


def _check_before_load(args, schedule) -> None:
    if not args.aux_loss_weight >= 0:
        raise ValueError(f"--aux-loss-weight must be >= 0, got {args.aux_loss_weight}")
    if args.export == "compatible":
        if args.dtype == "float16":
            raise ValueError("--export compatible scales LayerNorm weights by 1e6, which overflows float16: use "
                             "--dtype float32 or bfloat16, or --export structural")
        if args.position0 and schedule.gap_pos0 is None:
            raise ValueError("--export compatible has one σ per LayerNorm, but --position0 keeps a position-0 σ: "
                             "add --gap-pos0 G to collapse it at the end, or use --export structural")


def _check_model(args, model, schedule) -> int:
    from hf_compress.methods.ln_free.swap import architecture

    arch = architecture(model)  # TypeError for anything but GPT-2 / Llama family
    if args.export == "compatible" and arch != "gpt2":
        raise TypeError(f"--export compatible exists for GPT-2 only (this is a {type(model).__name__}): RMSNorm has "
                        "no epsilon trick; use --export structural")
    num_layers = len(model.transformer.h) if arch == "gpt2" else len(model.model.layers)
    last = schedule.last_step(num_layers)  # ValueError for inconsistent group starts
    if last >= args.steps:
        raise ValueError(f"the removal schedule removes its last norm at step {last} (0-based, {num_layers} layers), "
                         f"but --steps {args.steps} stops training before that: pass --steps {last + 1} or more, "
                         "or a shorter schedule (--start, --gap-*)")
    return num_layers


def run(args) -> dict:
    import math
    import tempfile

    import torch

    from hf_compress.cli.common import check_out, load_model_arg
    from hf_compress.integrations.hub import save_pretrained
    from hf_compress.methods.ln_free.aux_loss import LNFreeTrainer
    from hf_compress.methods.ln_free.callback import LNRemovalCallback
    from hf_compress.methods.ln_free.export import to_compatible, to_structural
    from hf_compress.methods.ln_free.schedule import LNRemovalSchedule
    from hf_compress.methods.ln_free.swap import estimate_std, fake_status, make_removable

    schedule = dataclass_from_args(LNRemovalSchedule, args, "schedule_")
    check_training_args(args)
    _check_before_load(args, schedule)
    check_out(args)
    model, tokenizer = load_model_arg(args.model, args.dtype)
    num_layers = _check_model(args, model, schedule)
    windows = training_windows(args, tokenizer)
    make_removable(model, position0=args.position0)
    estimate_std(model, list(windows[: 4 * args.batch_size].split(args.batch_size)))  # σ before the first removal
    removal = LNRemovalCallback(schedule)
    with tempfile.TemporaryDirectory(prefix="hfc-ln-free-") as tmp:
        trainer = LNFreeTrainer(model=model, args=training_arguments(args, tmp), train_dataset=as_dataset(windows),
                                aux_loss_weight=args.aux_loss_weight, callbacks=[removal])
        loss = trainer.train().training_loss
    if not math.isfinite(loss):
        raise ValueError(f"training diverged (loss {loss}); lower --lr or lengthen the schedule")
    still_real = [n for n, fake in fake_status(model).items() if not fake]
    if still_real:
        raise ValueError(f"{len(still_real)} norms were not removed ({', '.join(still_real[:6])}); lengthen --steps")
    model.eval()
    exported = to_structural(model) if args.export == "structural" else to_compatible(model, getattr(torch, args.dtype))
    save_pretrained(exported, args.out, tokenizer=tokenizer, base_model=card_base_model(args, model),
                    overwrite=args.overwrite)
    result = {"out": args.out, "export": args.export, "steps": args.steps, "training_loss": loss,
              "num_layers": num_layers, "removed": [[step, name] for step, name in removal.removed],
              "model_type": exported.config.model_type}
    print(f"LN-free: removed {len(removal.removed)} norms of {num_layers} layers over {args.steps} steps "
          f"(last at step {schedule.last_step(num_layers)}), training loss {loss:.4f}; saved the {args.export} "
          f"export ({exported.config.model_type}) to {args.out}")
    return result
