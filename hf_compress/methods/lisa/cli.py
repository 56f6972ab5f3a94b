"""``hf-compress lisa``: fine-tune a causal LM with LISA (layerwise importance sampling) and save the dense result.

    hf-compress lisa [MODEL] --out OUT --dataset TEXT --steps N [--num-active-layers 2 --interval-steps 20 ...]
                     [--lr --batch-size --seq-len --warmup-steps --weight-decay --seed] [--dtype] [--adapter]
                     [--overwrite]

Every :class:`~hf_compress.methods.lisa.config.LisaSettings` field is a flag (generated from the dataclass, so none
is forgotten; its ``seed`` is ``--lisa-seed``, default ``--seed``). The result is a plain transformers model, or with
``--adapter`` a LISA PEFT adapter (only the changed tensors, with its model card).
"""

from __future__ import annotations

from hf_compress.cli.common import add_model_command
from hf_compress.cli.training import (add_dataclass_args, add_training_args, as_dataset, card_base_model,
                                      check_training_args, dataclass_from_args, training_arguments, training_windows)


def add_command(sub) -> None:
    from hf_compress.methods.lisa.config import LisaSettings

    p = add_model_command(sub, "lisa", help="fine-tune MODEL with LISA (embeddings, head and sampled layers) and save it",
                          description="Fine-tune MODEL with LISA (Pan et al. 2024): the embeddings, the head and "
                                      "num-active-layers sampled decoder layers train in each interval; save the "
                                      "fine-tuned dense model to --out.",
                          out_help="folder for the fine-tuned model")
    add_training_args(p, lr=5e-5)
    add_dataclass_args(p, LisaSettings, "lisa_", rename={"seed": "lisa_seed"}, title="LISA (LisaConfig)")
    p.add_argument("--adapter", action="store_true",
                   help="train through the PEFT method and save OUT as a LISA adapter (the changed tensors only)")
    p.set_defaults(handler=run)


def _is_main_process() -> bool:
    import torch

    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def run(args) -> dict:
    import math
    import tempfile

    from transformers import Trainer

    from hf_compress.cli.common import check_out, load_model_arg
    from hf_compress.integrations.hub import save_pretrained
    from hf_compress.methods.lisa.callback import LisaCallback, LisaSchedule
    from hf_compress.methods.lisa.config import LisaConfig, LisaSettings

    config = dataclass_from_args(LisaSettings, args, "lisa_")
    check_training_args(args)
    check_out(args)
    model, tokenizer = load_model_arg(args.model, args.dtype)
    schedule = LisaSchedule(model, config)  # validates num_active_layers / layers against the model; changes nothing
    windows = training_windows(args, tokenizer)
    if args.adapter:
        from peft import get_peft_model

        from hf_compress.integrations.hub import enable_hub_cards

        model = get_peft_model(model, LisaConfig(**config.to_dict()))
        enable_hub_cards(model, tags=["lisa"])
        callback = LisaCallback()  # takes the model's LisaConfig
    else:
        callback = LisaCallback.from_config(config)
    with tempfile.TemporaryDirectory(prefix="hfc-lisa-") as tmp:
        trainer = Trainer(model=model, args=training_arguments(args, tmp), train_dataset=as_dataset(windows),
                          callbacks=[callback])
        loss = trainer.train().training_loss
    if not math.isfinite(loss):
        raise ValueError(f"training diverged (loss {loss}); lower --lr")
    model.eval()
    if _is_main_process():  # under torchrun every rank holds the same model; two ranks staging OUT would race
        save_pretrained(model, args.out, tokenizer=tokenizer, base_model=card_base_model(args, model),
                        overwrite=args.overwrite)
    result = {"out": args.out, "steps": args.steps, "training_loss": loss, "num_layers": schedule.num_layers,
              "num_active_layers": config.num_active_layers, "interval_steps": config.interval_steps,
              "sampled": [layers for _, layers in callback.history]}
    print(f"LISA: {args.steps} steps, {config.num_active_layers} of {schedule.num_layers} layers every "
          f"{config.interval_steps} steps, training loss {loss:.4f}; saved {args.out}")
    return result
