"""``hf-compress cskv``: convert a Llama to CSKV (ASVD-initialised low-rank K/V latents) and save it.

    hf-compress cskv [MODEL] --out OUT --reduction 0.8 [--latent-bits 4] [--window 32] [--train-steps 200 --lr 1e-3]
                     [--dataset TEXT --num-samples 8 --seq-len 512]
"""

from __future__ import annotations

from hf_compress.cli.common import add_calibration_args, add_model_command


def add_command(sub) -> None:
    p = add_model_command(sub, "cskv", help="convert MODEL to CSKV (low-rank key/value latents cached) and save it",
                          description="Split k_proj/v_proj into low-rank A/B by activation-scaled SVD, optionally "
                                      "train A/B to reconstruct K and V, and save a model whose generate() caches the "
                                      "latents (plus the newest --window tokens' exact K/V).",
                          out_help="folder for the CSKV model")
    p.add_argument("--reduction", type=float, required=True, help="fraction of key/value channels removed (0.8)")
    p.add_argument("--latent-bits", type=int, default=16, choices=[2, 4, 8, 16], help="width of the cached latents")
    p.add_argument("--window", type=int, default=32, help="newest tokens whose exact K/V are kept")
    p.add_argument("--train-steps", type=int, default=0, help="A/B reconstruction training steps per layer (0: none)")
    p.add_argument("--lr", type=float, default=1e-3)
    add_calibration_args(p)
    p.set_defaults(handler=run)


def run(args) -> dict:
    from hf_compress.cli.common import calibration_from_args, check_out, load_model_arg
    from hf_compress.integrations.hub import save_pretrained
    from hf_compress.methods.cskv.asvd import collect_scales, convert, ranks_for
    from hf_compress.methods.cskv.training import train_reconstruction

    ranks_for(args.reduction, 64)  # fail on a bad reduction before loading anything
    check_out(args)
    model, tokenizer = load_model_arg(args.model, args.dtype)
    batches = calibration_from_args(args, tokenizer)
    cskv = convert(model, reduction=args.reduction, scales=collect_scales(model, batches), window=args.window,
                   latent_bits=args.latent_bits)
    losses = train_reconstruction(cskv, model, batches, args.train_steps, args.lr, seed=args.seed) if args.train_steps else []
    save_pretrained(cskv, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    trained = f", reconstruction loss {losses[0]:.4g} → {losses[-1]:.4g}" if losses else ""
    print(f"CSKV: ranks K {cskv.config.cskv['rank_k'][0]}, V {cskv.config.cskv['rank_v'][0]} per layer{trained}; saved {args.out}")
    return {"out": args.out, "rank_k": cskv.config.cskv["rank_k"], "losses": losses[:1] + losses[-1:]}
