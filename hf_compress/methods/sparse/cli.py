"""``hf-compress prune [MODEL] --out OUT --method ecoflap --sparsity 0.6`` (also magnitude, wanda, sparsegpt, armor;
``--pattern 2:4``; ``--bits 4`` for sparse + integer codes). Every pruning method is also a quantization method, so
``hf-compress quantize --method wanda --sparsity 0.6`` does the same; this command adds the pruning summary."""

from __future__ import annotations

import json
import time

PRUNING = ("magnitude", "wanda", "sparsegpt", "ecoflap", "armor")
HELP = "prune MODEL (magnitude, Wanda, SparseGPT, ECoFLaP, ARMOR) and save a checkpoint that loads natively"


def add_command(sub) -> None:
    from hf_compress.cli.common import add_model_command

    p = add_model_command(sub, "prune", help=HELP, out_help="folder for the pruned checkpoint")
    p.add_argument("--method", choices=[m for m in PRUNING if _registered(m)], default="wanda")
    p.add_argument("--sparsity", type=float, default=None, help="fraction pruned, in [0, 1) (global for ecoflap)")
    p.add_argument("--pattern", default=None, help="'unstructured' (default) or N:M, e.g. 2:4, 4:8")
    p.add_argument("--bits", type=int, default=None, help="also store the kept values as integer codes of this width")
    p.add_argument("--group-size", type=int, default=None, help="group of the integer grid (with --bits)")
    p.add_argument("--max-sparsity", type=float, default=None, help="ecoflap: per-block cap (default sparsity + 0.1)")
    p.add_argument("--local", choices=["wanda", "sparsegpt"], default=None, help="ecoflap: the per-module pruner")
    p.add_argument("--iters", type=int, default=None, help="armor: optimisation steps per module")
    p.add_argument("--dataset", default=None, help="calibration text (default: WikiText-2 valid)")
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--skip", action="append", default=[], metavar="REGEX", help="keep matching modules dense")
    p.add_argument("--eval", action="store_true", help="also report WikiText-2 test perplexity (40 × 512 windows)")
    p.set_defaults(handler=run)


def _registered(name: str) -> bool:
    from hf_compress.registry import methods

    return any(m.name == name for m in methods())


def config_from_args(args):
    from hf_compress.registry import get_method

    cls = get_method(args.method).config_class()
    given = {k: getattr(args, k) for k in ("sparsity", "pattern", "bits", "group_size", "max_sparsity", "local", "iters",
                                           "num_samples", "seq_len") if getattr(args, k) is not None}
    foreign = [k for k in ("max_sparsity", "local") if k in given and args.method != "ecoflap"]
    foreign += ["iters"] if "iters" in given and args.method != "armor" else []
    if foreign:
        raise ValueError(f"--method {args.method} takes no {', '.join('--' + k.replace('_', '-') for k in foreign)}")
    return cls(modules_to_not_convert=args.skip, **given)


def run(args) -> dict:
    from hf_compress.calibration.data import default_text_source
    from hf_compress.cli.common import check_out, load_model_arg
    from hf_compress.formats.sparse import SparseLinear
    from hf_compress.integrations.hub import save_pretrained
    from hf_compress.pipeline.quantize import quantize
    from hf_compress.report import checkpoint_bytes, format_bytes

    check_out(args)
    config = config_from_args(args)  # bad options fail before the model loads
    model, tokenizer = load_model_arg(args.model, args.dtype)
    calibration = (args.dataset or default_text_source("validation")) if config.needs_calibration else None
    t = time.perf_counter()
    quantize(model, config, calibration=calibration, tokenizer=tokenizer)
    seconds = time.perf_counter() - t
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    stored = sum(m.stored_bytes() for m in sparse)
    fp32 = sum(m.in_features * m.out_features for m in sparse) * 4
    result = {"method": args.method, "sparsity": config.report["sparsity"], "prune_seconds": round(seconds, 1),
              "module_bytes": stored, "module_fp32_bytes": fp32}
    results = []
    if args.eval:
        from hf_compress.evaluation import perplexity
        from hf_compress.integrations.card_inputs import perplexity_result

        ppl = perplexity(model, tokenizer, default_text_source("test"), 512, 40)
        result["perplexity"] = round(ppl, 3)
        results.append(perplexity_result(ppl, protocol="40 × 512-token windows"))
    save_pretrained(model, args.out, tokenizer=tokenizer, results=results, overwrite=args.overwrite)
    result["checkpoint_bytes"] = checkpoint_bytes(args.out)
    print(f"\npruned      {config.report['sparsity']:.2%} of {len(sparse)} modules ({args.method}) in {seconds:.1f} s")
    print(f"modules     {format_bytes(stored)} stored vs {format_bytes(fp32)} in fp32 ({stored / fp32:.3f}x)")
    if "perplexity" in result:
        print(f"perplexity  {result['perplexity']:.3f} (WikiText-2 test, 40 x 512)")
    print(json.dumps(result))
    return result
