"""``hf-compress kv-plan``: search a per-layer KV cache plan and save the model with it.

    hf-compress kv-plan [MODEL] --out OUT --avg-bits 3 [--pairs KV8,K8V4,KV4,K4V2,KV2] [--search knapsack|nsga2]
                        [--group-size 32 --residual-length 32] [--dataset TEXT --num-samples 8 --seq-len 512]

The saved folder loads with plain ``AutoModelForCausalLM.from_pretrained`` and its ``generate()`` uses the plan.
"""

from __future__ import annotations

from hf_compress.cli.common import add_calibration_args, add_model_command


def add_command(sub) -> None:
    p = add_model_command(sub, "kv-plan", help="search a per-layer K/V cache precision plan (KVTuner) and save it",
                          description="Score each layer's attention output under every candidate (K, V) width pair "
                                      "on calibration text, pick one pair per layer under an average-bit budget, and "
                                      "save MODEL with the plan (generate() then uses it).",
                          out_help="folder for the model with its KV plan")
    p.add_argument("--avg-bits", type=float, required=True, help="budget: mean nominal K/V width over layers")
    p.add_argument("--pairs", default="KV8,K8V4,KV4,K4V2,KV2", help="candidate pairs, comma-separated")
    p.add_argument("--search", default="knapsack", choices=["knapsack", "nsga2"],
                   help="exact knapsack, or Optuna NSGA-II as in the released code (needs optuna)")
    p.add_argument("--n-trials", type=int, default=300, help="NSGA-II trials")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--residual-length", type=int, default=32, help="newest tokens kept in full precision")
    add_calibration_args(p)
    p.set_defaults(handler=run)


def run(args) -> dict:
    from hf_compress.cli.common import calibration_from_args, check_out, load_model_arg
    from hf_compress.integrations.hub import save_pretrained
    from hf_compress.methods.kvtuner.modeling import with_kv_plan
    from hf_compress.methods.kvtuner.tune import check_budget, kv_plan, parse_pairs

    check_budget(args.avg_bits, parse_pairs(args.pairs))  # fail on a typo or an impossible budget before loading
    check_out(args)
    model, tokenizer = load_model_arg(args.model, args.dtype)
    batches = calibration_from_args(args, tokenizer)
    kwargs = {"n_trials": args.n_trials, "seed": args.seed} if args.search == "nsga2" else {}
    plan = kv_plan(model, batches, args.avg_bits, pairs=args.pairs, search=args.search, group_size=args.group_size,
                   residual_length=args.residual_length, **kwargs)
    model = with_kv_plan(model, plan)
    save_pretrained(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"KV plan ({args.search}): {plan.average_bits:.2f} average bits — {' '.join(plan.pairs())}; saved {args.out}")
    return {"out": args.out, "average_bits": plan.average_bits, "pairs": plan.pairs()}
