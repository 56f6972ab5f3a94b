"""``hf-compress diffrate``: learn per-layer token pruning + merging counts for a ViT/DeiT classifier and save it.

    hf-compress diffrate MODEL --out OUT --target-flops 0.5 [--dataset digits|IMAGES.safetensors]
                         [--steps 200 --batch-size 64 --lr 0.05 --flops-weight 200 --granularity 1
                          --init uniform|full --seed 0]
                         [--prune-kept 65,60,… --merge-kept 65,55,…] [--overwrite] [--dtype]

The search (``search_rates``) runs on ``--dataset`` (scikit-learn's digits upsampled to the model's image size,
or a safetensors file with ``pixel_values`` [N, C, H, W] and ``labels`` [N]); ``--prune-kept/--merge-kept`` skip
it and store the given schedule. OUT loads with ``AutoModelForImageClassification.from_pretrained``.
"""

from __future__ import annotations

import argparse

from hf_compress.cli.common import add_model_command


def _counts(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {value!r}") from None


def add_command(sub) -> None:
    p = add_model_command(sub, "diffrate", help="learn per-layer token pruning/merging counts for a ViT and save it",
                          description="DiffRate (Chen et al., ICCV 2023): search each layer's kept-token counts "
                                      "of a ViT/DeiT image classifier under a FLOPs target; save the token-reduced "
                                      "model to --out.", out_help="folder for the token-reduced model")
    g = p.add_argument_group("search (search_rates())")
    g.add_argument("--target-flops", type=float, default=0.5,
                   help="FLOPs budget as a fraction of the model's (default: 0.5)")
    g.add_argument("--dataset", default="digits",
                   help="'digits' (scikit-learn, needs hf-compress[diffrate]) or a .safetensors file with "
                        "pixel_values and labels (default: digits)")
    g.add_argument("--steps", type=int, default=200, help="optimizer steps on the rate logits (default: 200)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=0.05, help="Adam learning rate of the rate logits (default: 0.05)")
    g.add_argument("--flops-weight", type=float, default=200.0,
                   help="λ of (FLOPs/FLOPs₀ − target)² in the loss (default: 200)")
    g.add_argument("--granularity", type=int, default=1, help="gap between candidate token counts (default: 1)")
    g.add_argument("--init", choices=("uniform", "full"), default="uniform",
                   help="start of the rate distributions: uniform over the candidates (the paper) or near keeping "
                        "every token (default: uniform)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("fixed schedule (no search)")
    g.add_argument("--prune-kept", type=_counts, default=None, help="tokens kept after each layer's pruning")
    g.add_argument("--merge-kept", type=_counts, default=None, help="tokens kept after each layer's merging")
    p.set_defaults(handler=run)


def _images(args, config):
    import torch

    from hf_compress.methods.diffrate.data import digits, load_images

    if args.dataset == "digits":
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        pixels, labels = digits(size, "train", seed=args.seed)
        pixels = pixels.expand(-1, config.num_channels, -1, -1).contiguous()
    else:
        pixels, labels = load_images(args.dataset)
    if labels.max().item() >= config.num_labels:
        raise ValueError(f"labels go up to {labels.max().item()} but the model has {config.num_labels} classes")
    return pixels.to(torch.float32), labels


def run(args) -> dict:
    import torch
    from transformers import AutoModelForImageClassification

    from hf_compress.cli.common import check_out
    from hf_compress.integrations.hub import save_pretrained
    from hf_compress.methods.diffrate.flops import FlopsSpec, count_flops
    from hf_compress.methods.diffrate.layout import token_counts
    from hf_compress.methods.diffrate.modeling import compress
    from hf_compress.methods.diffrate.search import search_rates

    if args.model is None:
        raise ValueError("hf-compress diffrate needs MODEL: a ViT/DeiT image-classification checkpoint (Hub id or folder)")
    if (args.prune_kept is None) != (args.merge_kept is None):
        raise ValueError("--prune-kept and --merge-kept go together")
    check_out(args)
    model = AutoModelForImageClassification.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    if args.prune_kept is not None:
        prune, merge, info = args.prune_kept, args.merge_kept, {"source": "given"}
    else:
        pixels, labels = _images(args, model.config)
        found = search_rates(model, pixels.to(model.dtype), labels, args.target_flops, steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, flops_weight=args.flops_weight,
                             granularity=args.granularity, init=args.init, seed=args.seed)
        prune, merge = found["prune_kept"], found["merge_kept"]
        info = {"source": "search", "target_flops": args.target_flops, "steps": args.steps, "dataset": args.dataset,
                "granularity": args.granularity, "flops_weight": args.flops_weight, "init": args.init}
    reduced = compress(model, prune, merge, search_info=info)
    save_pretrained(reduced, args.out, overwrite=args.overwrite)
    spec = FlopsSpec.from_config(model.config, token_counts(model)[1])
    ratio = count_flops(spec, prune, merge) / count_flops(spec)
    print(f"diffrate: kept tokens after pruning {prune}, after merging {merge}; {ratio:.1%} of the FLOPs; "
          f"saved {args.out}")
    return {"out": args.out, "prune_kept": prune, "merge_kept": merge, "flops_ratio": ratio}
