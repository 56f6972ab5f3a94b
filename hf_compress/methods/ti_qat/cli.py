"""``hf-compress qat``: quantization-aware training with distillation (and Teacher Intervention) from a
full-precision teacher; saves a packed checkpoint that loads natively.

    hf-compress qat [MODEL] --out OUT --dataset TEXT --steps N [--bits 2 --group-size 64 --sym --ternary
                    --learn-scales --init-from PACKED] [--intervention-steps 60 --schedule output:1,context:1,map:4]
                    [--kd-logits 1 --kd-hidden 1 --kd-attention 1 --kd-attention-output 1 --kd-label 0]
                    [--lr --batch-size --seq-len --warmup-steps --weight-decay --seed] [--gradient-checkpointing]

MODEL is the teacher (and, without ``--init-from``, the student's starting point). ``--intervention-steps 0`` is
plain KD-QAT. Every TIConfig and DistillationLoss field is a flag (generated from the dataclasses).
"""

from __future__ import annotations

from hf_compress.cli.common import add_model_command
from hf_compress.cli.training import (add_dataclass_args, add_training_args, as_dataset, card_base_model,
                                      check_training_args, dataclass_from_args, training_arguments, training_windows)

_KD_RENAME = {"logits": "kd_logits", "hidden": "kd_hidden", "attention": "kd_attention",
              "attention_output": "kd_attention_output", "label": "kd_label", "temperature": "kd_temperature",
              "relative": "kd_relative"}


def add_command(sub) -> None:
    from hf_compress.methods.ti_qat.intervention import TIConfig
    from hf_compress.methods.ti_qat.losses import DistillationLoss

    p = add_model_command(sub, "qat", help="quantization-aware training with KD / Teacher Intervention; save packed",
                          description="Train MODEL's linears on an hf-compress grid (fake quantization, straight-through "
                                      "gradients) against MODEL as full-precision teacher, with Teacher Intervention "
                                      "(Kim et al. 2023) for the first --intervention-steps, then save the packed model.",
                          out_help="folder for the packed checkpoint")
    add_training_args(p, lr=2e-5)
    g = p.add_argument_group("grid")
    g.add_argument("--bits", type=int, default=2, help="code width (default: 2)")
    g.add_argument("--group-size", type=int, default=64, help="columns per scale (-1: per row; default: 64)")
    g.add_argument("--sym", action="store_true", help="symmetric grid (no zero points)")
    g.add_argument("--ternary", action="store_true", help="ternary weights (stored as 2-bit symmetric codes; implies "
                                                          "--bits 2 --sym)")
    g.add_argument("--learn-scales", action="store_true", help="train the scales too (LSQ)")
    g.add_argument("--clip-grid", type=int, default=0, help="clipping candidates for the starting grid (default: 0)")
    g.add_argument("--init-from", default=None, help="start the student from this packed checkpoint (e.g. GPTQ's)")
    g.add_argument("--teacher-dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"],
                   help="teacher precision (default: bfloat16)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute the student's activations")
    add_dataclass_args(p, TIConfig, "ti_", title="Teacher Intervention (TIConfig)")
    add_dataclass_args(p, DistillationLoss, "kd_", rename=_KD_RENAME, title="distillation loss weights")
    p.set_defaults(handler=run)


def run(args) -> dict:
    import math
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, Trainer

    from hf_compress.cli.common import check_out, load_model_arg
    from hf_compress.integrations.hub import save_pretrained
    from hf_compress.methods.ti_qat.callback import TeacherInterventionCallback
    from hf_compress.methods.ti_qat.config import TIQATConfig
    from hf_compress.methods.ti_qat.convert import export_packed, prepare_qat
    from hf_compress.methods.ti_qat.intervention import TeacherIntervention, TIConfig
    from hf_compress.methods.ti_qat.losses import DistillationLoss

    ti = dataclass_from_args(TIConfig, args, "ti_")
    kd = dataclass_from_args(DistillationLoss, args, "kd_")
    bits, sym = (2, True) if args.ternary else (args.bits, args.sym)
    config = TIQATConfig(bits=bits, group_size=args.group_size, sym=sym, ternary=args.ternary,
                         learn_scales=args.learn_scales, clip_grid=args.clip_grid)
    check_training_args(args)
    check_out(args)
    teacher, tokenizer = load_model_arg(args.model, args.teacher_dtype)
    if args.init_from:
        from hf_compress import register

        register()
        student = AutoModelForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
    else:
        student, _ = load_model_arg(args.model, args.dtype)
    prepare_qat(student, config)
    if args.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    model = TeacherIntervention(student, teacher, ti, kd)
    callback = TeacherInterventionCallback(ti)
    windows = training_windows(args, tokenizer)
    with tempfile.TemporaryDirectory(prefix="hfc-qat-") as tmp:
        trainer = Trainer(model=model, args=training_arguments(args, tmp), train_dataset=as_dataset(windows),
                          callbacks=[callback])
        loss = trainer.train().training_loss
    if not math.isfinite(loss):
        raise ValueError(f"training diverged (loss {loss}); lower --lr")
    config.training = {**callback.describe(), "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
                       "seq_len": args.seq_len, "loss_weights": vars(kd), "teacher_dtype": args.teacher_dtype,
                       "training_loss": round(loss, 6)}
    student.eval()
    export_packed(student, config)
    save_pretrained(student, args.out, tokenizer=tokenizer, base_model=card_base_model(args, teacher),
                    overwrite=args.overwrite)
    print(f"QAT: {args.steps} steps ({ti.intervention_steps} with Teacher Intervention), {bits}-bit"
          f"{' ternary' if args.ternary else ''}, training loss {loss:.4f}; saved {args.out}")
    return {"out": args.out, "steps": args.steps, "training_loss": loss, "phases": callback.history,
            "bits_per_weight": config.report["bits_per_weight"]}
