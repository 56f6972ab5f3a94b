"""``hf-compress steer``: learn a LinEAS steering adapter from two prompt files and save it.

    hf-compress steer [MODEL] --source SRC.txt --target TGT.txt --out OUT [--target-modules NAME ...]
                      [--strength 1.0 --l1-penalty 0 --group-penalty 0] [--steps 100 --lr 0.01 --optimizer adam
                      --batch-size --micro-batch 16 --max-length 64 --seed 0] [--mean-shift] [--overwrite]

SRC and TGT hold one prompt per non-blank line (unpaired; a few dozen each suffice). OUT is a PEFT adapter:
``PeftModel.from_pretrained(base, OUT)`` steers ``base`` from the source style towards the target style;
``model.set_strength(λ)`` scales the effect (0 = the base model). Every :class:`LineasTraining` field is a flag.
"""

from __future__ import annotations

from hf_compress.cli.common import add_model_command
from hf_compress.cli.training import add_dataclass_args, card_base_model, dataclass_from_args


def add_command(sub) -> None:
    from hf_compress.methods.lineas.train import LineasTraining

    p = add_model_command(sub, "steer", help="learn a LinEAS activation-steering adapter from source/target prompts",
                          description="Learn per-layer coordinate-wise affine maps on MODEL's activations so that "
                                      "the source prompts' activations match the target prompts' (LinEAS, "
                                      "Rodriguez et al. 2025); save them as a PEFT adapter to --out.",
                          out_help="folder for the adapter")
    p.add_argument("--source", required=True, help="text file, one source prompt per line (the behaviour to move away from)")
    p.add_argument("--target", required=True, help="text file, one target prompt per line (the behaviour to move to)")
    g = p.add_argument_group("adapter (LineasConfig)")
    g.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                   help="modules whose outputs are steered (default: the model type's, e.g. post_attention_layernorm)")
    g.add_argument("--strength", type=float, default=1.0, help="λ stored with the adapter (0 = identity; default: 1)")
    g.add_argument("--l1-penalty", type=float, default=0.0, help="λ1 of the sparse-group-lasso (default: 0)")
    g.add_argument("--group-penalty", type=float, default=0.0, help="λG of the sparse-group-lasso (default: 0)")
    g.add_argument("--mean-shift", action="store_true",
                   help="fit the local mean-shift baseline (closed form, no training) instead of LinEAS")
    add_dataclass_args(p, LineasTraining, "train_", title="training (LineasTraining)")
    p.set_defaults(handler=run)


def run(args) -> dict:
    from peft import get_peft_model

    from hf_compress.cli.common import check_out, load_model_arg
    from hf_compress.integrations.hub import enable_hub_cards, save_pretrained
    from hf_compress.methods.lineas.config import LineasConfig
    from hf_compress.methods.lineas.train import LineasTraining, fit_mean_shift, read_prompts, train_lineas

    training = dataclass_from_args(LineasTraining, args, "train_")
    config = LineasConfig(target_modules=args.target_modules, strength=args.strength, l1_penalty=args.l1_penalty,
                          group_penalty=args.group_penalty)
    source, target = read_prompts(args.source), read_prompts(args.target)
    check_out(args)
    model, tokenizer = load_model_arg(args.model, args.dtype)
    model = get_peft_model(model, config)
    enable_hub_cards(model, tags=["lineas", "activation-steering"])
    if args.mean_shift:
        fit_mean_shift(model, tokenizer, source, target, max_length=training.max_length,
                       micro_batch=training.micro_batch)
        result = {"method": "mean-shift"}
    else:
        history = train_lineas(model, tokenizer, source, target, training)
        result = {"method": "lineas", "initial_loss": history["initial_loss"], "final_loss": history["final_loss"]}
    save_pretrained(model, args.out, tokenizer=tokenizer, base_model=card_base_model(args, model),
                    overwrite=args.overwrite)
    done = (f"loss {result['initial_loss']:.4g} -> {result['final_loss']:.4g} in {training.steps} steps"
            if "final_loss" in result else "mean shift fitted")
    print(f"LinEAS: {len(source)} source / {len(target)} target prompts, {done}; saved {args.out}")
    from hf_compress.methods.lineas.model import lineas_layers

    return {**result, "out": args.out, "steered_modules": len(lineas_layers(model))}
