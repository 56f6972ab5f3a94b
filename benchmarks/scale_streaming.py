"""The streaming parts of ``benchmarks/scale.py`` (``--part streaming`` and ``--part larger-than-ram``).

Each quantization runs in its own process, so its peak RSS (``ru_maxrss``) is its own; "RSS ready" is the
process's RSS once torch, transformers and hf-compress are imported, before any model is touched.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import write_section

STREAMING_TITLE = "## Streaming quantization (one block in memory)"
LARGE_TITLE = "## Larger than RAM (synthetic checkpoint, streamed)"

WORKER = r'''
import json, resource, sys, time
import torch, transformers
import hf_compress
from hf_compress.calibration.data import CalibrationSpec, default_text_source
from hf_compress.pipeline import streaming

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

spec = json.loads(sys.argv[1])
ready = rss_mb()
config = getattr(hf_compress, spec["config"])(**spec["kwargs"])
calibration = (CalibrationSpec(default_text_source("validation"), spec["samples"], 512, 0)
               if config.needs_calibration else None)
stamps = []
release = streaming.StreamedBlocks.release
def timed_release(io, index, block):
    release(io, index, block)
    stamps.append(time.perf_counter())
streaming.StreamedBlocks.release = timed_release
start = time.perf_counter()
if spec["mode"] == "floor":  # what either path holds before any weight: libraries, model class, tokenizer, windows
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from hf_compress.calibration.data import calibration_batches
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec["source"]))
    calibration_batches(calibration, AutoTokenizer.from_pretrained(spec["source"]))
elif spec["mode"] == "streamed":
    hf_compress.quantize_streaming(spec["source"], config, spec["out"], calibration=calibration, progress=False,
                                   overwrite=True)
else:
    model, tokenizer = hf_compress.load_model(spec["source"])
    hf_compress.quantize(model, config, calibration=calibration, tokenizer=tokenizer, progress=False)
    hf_compress.save_pretrained(model, spec["out"], tokenizer=tokenizer, overwrite=True)
seconds = time.perf_counter() - start
blocks = [b - a for a, b in zip(stamps, stamps[1:])]
json.dump({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "ready_mb": ready, "block_seconds": blocks, "first_block_at": stamps[0] - start if stamps else None},
          open(spec["result"], "w"))
'''


def run_worker(spec: dict, tmp: Path) -> dict:
    spec = {**spec, "result": str(tmp / f"result-{time.monotonic_ns()}.json")}
    done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(spec)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-4000:])
    result = json.loads(Path(spec["result"]).read_text())
    print(spec["mode"], spec["source"], {k: v for k, v in result.items() if k != "block_seconds"}, flush=True)
    return result


def write_synthetic(folder: Path, config, tokenizer_dir: Path | None, dtype_name: str = "bfloat16") -> int:
    """A random Llama checkpoint written one block (shard) at a time: never more than one block in memory."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    dtype = getattr(torch, dtype_name)
    groups: dict[str, list[str]] = {}
    for key in shapes:
        parts = key.split(".")
        group = ".".join(parts[:3]) if key.startswith("model.layers.") else "rest"
        groups.setdefault(group, []).append(key)
    names = list(groups)
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for i, group in enumerate(names):
        tensors = {}
        for key in groups[group]:
            shape = shapes[key]
            if key.endswith("norm.weight"):
                tensors[key] = torch.ones(shape, dtype=dtype)
            else:
                tensors[key] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
        name = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    config.save_pretrained(folder)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")) or f.name in ("vocab.json", "merges.txt"):
                shutil.copy(f, folder / f.name)
    return total


def _header(command: str) -> str:
    import torch
    import transformers

    import hf_compress

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"Command: `{command}` · machine: {platform.machine()}, {os.cpu_count()} CPU cores, {mem:.0f} GiB RAM, no "
            f"GPU · hf-compress {hf_compress.__version__}, torch {torch.__version__}, transformers "
            f"{transformers.__version__} · date: {datetime.date.today().isoformat()}")


def _same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    x, y = tensors(a), tensors(b)
    return sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


def smollm2_like(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                       rope_theta=100000.0)


def streaming(args) -> None:
    from hf_compress.models import default_model_dir

    source = default_model_dir()
    tmp = Path(tempfile.mkdtemp(prefix="hfc-stream-", dir=args.workdir))
    gptq = {"config": "GPTQConfig", "kwargs": {"bits": 4, "group_size": 64}, "samples": args.samples}
    rows = {}
    # the in-memory row (the slow one) and its checkpoint are kept between runs; --fresh measures it again
    cache = Path.home() / ".cache" / "hf_compress" / "bench_scale"
    memory_out, memory_json = cache / f"in-memory-gptq4-g64-s{args.samples}", cache / f"in-memory-gptq4-g64-s{args.samples}.json"
    try:
        if args.fresh or not memory_json.is_file() or not memory_out.is_dir():
            cache.mkdir(parents=True, exist_ok=True)
            rows["in memory"] = run_worker({**gptq, "mode": "in-memory", "source": str(source), "out": str(memory_out)}, tmp)
            memory_json.write_text(json.dumps(rows["in memory"]))
        else:
            rows["in memory"] = json.loads(memory_json.read_text())
            print("in memory (cached)", rows["in memory"], flush=True)
        rows["floor (no weights)"] = run_worker({**gptq, "mode": "floor", "source": str(source), "out": ""}, tmp)
        rows["streamed"] = run_worker({**gptq, "mode": "streamed", "source": str(source), "out": str(tmp / "streamed")},
                                      tmp)
        identical = _same_tensors(memory_out, tmp / "streamed")
        depth_rows = {}
        rtn = {"config": "RTNConfig", "kwargs": {"bits": 4, "group_size": 64}, "samples": 0}
        for layers in (15, 30, 60):
            folder = tmp / f"random-{layers}"
            write_synthetic(folder, smollm2_like(layers), source, "float32")
            for mode in ("in-memory", "streamed"):
                depth_rows[(layers, mode)] = run_worker({**rtn, "mode": mode, "source": str(folder),
                                                         "out": str(tmp / f"out-{layers}-{mode}")}, tmp)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mem, st, floor = rows["in memory"], rows["streamed"], rows["floor (no weights)"]
    activations = args.samples * 512 * (576 + 2 * 64) * 4 / 2**20
    weights_mb = sum(f.stat().st_size for f in Path(source).glob("*.safetensors")) / 2**20
    lines = [STREAMING_TITLE, "", _header(f"python benchmarks/scale.py --part streaming --samples {args.samples}"), "",
             f"GPTQ 4-bit g64 on all 30 blocks of SmolLM2-135M-Instruct (fp32 safetensors copy), {args.samples} "
             "WikiText-2 windows of 512. In memory = load, `quantize`, `save_pretrained`; streamed = "
             "`quantize_streaming` (same calibration, same solver). One process each.", "",
             "| run | peak RSS MB | RSS ready MB | peak − ready MB | seconds | median s/block |", "|---|---|---|---|---|---|"]
    for name in ("in memory", "streamed", "floor (no weights)"):
        r = rows[name]
        per_block = f"{statistics.median(r['block_seconds']):.1f}" if r["block_seconds"] else "—"
        lines.append(f"| {name} | {r['peak_mb']:.0f} | {r['ready_mb']:.0f} | {r['peak_mb'] - r['ready_mb']:.0f} | "
                     f"{r['seconds']:.1f} | {per_block} |")
    lines += ["", f"Streamed peak = {100 * st['peak_mb'] / mem['peak_mb']:.0f}% of the in-memory peak (goal: below 40%); "
              f"above the imported libraries, {100 * (st['peak_mb'] - st['ready_mb']) / (mem['peak_mb'] - mem['ready_mb']):.0f}%. "
              f"Checkpoint tensors identical: {'yes' if identical else 'NO'}.", "",
              f"Floor: a process that imports the libraries, builds the model class on the meta device, loads the "
              f"tokenizer and cuts the calibration windows, and holds no weight, peaks at {floor['peak_mb']:.0f} MB "
              f"= {100 * floor['peak_mb'] / mem['peak_mb']:.0f}% of the in-memory peak; with the one set of "
              f"calibration activations streaming must hold ({activations:.0f} MB: {args.samples} × 512 × 576 fp32 "
              f"hidden states and their rotary tables, computed from the shapes) that is "
              f"{100 * (floor['peak_mb'] + activations) / mem['peak_mb']:.0f}% before any block, solver or writer "
              f"memory.", "",
              f"Lower bound: the in-memory path must hold the fp32 weights ({weights_mb:.0f} MB) on top of the "
              f"{mem['ready_mb']:.0f} MB the imports already hold, so even a perfectly lean in-memory run peaks at "
              f"≥ {mem['ready_mb'] + weights_mb:.0f} MB, and 40 % of that ({0.4 * (mem['ready_mb'] + weights_mb):.0f} MB) "
              f"lies below the imports alone: on this model the goal can only hold against a wasteful in-memory path.", "",
              "Peak RSS against depth: RTN 4-bit g64 on random fp32 Llama checkpoints of SmolLM2's width (hidden 576, "
              "tied 49152×576 embeddings):", "",
              "| blocks | weights MB (fp32) | in memory: peak MB | streamed: peak MB | streamed: peak − ready MB |",
              "|---|---|---|---|---|"]
    for layers in (15, 30, 60):
        a, b = depth_rows[(layers, "in-memory")], depth_rows[(layers, "streamed")]
        size = (49152 * 576 + layers * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576) + 576) * 4 / 2**20
        lines.append(f"| {layers} | {size:.0f} | {a['peak_mb']:.0f} | {b['peak_mb']:.0f} | {b['peak_mb'] - b['ready_mb']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(STREAMING_TITLE, text)


FLOOR_TITLE = "## Import floor of a quantization process"
FLOOR_STEPS = [("import torch", "import torch"), ("+ import transformers", "import transformers"),
               ("+ from transformers import LlamaForCausalLM", "from transformers import LlamaForCausalLM"),
               ("+ import hf_compress", "import hf_compress")]


def import_floor(args) -> None:
    """Peak RSS of fresh interpreters that only import, cumulatively: the memory every quantization path pays first."""
    rows = []
    for i, (label, _) in enumerate(FLOOR_STEPS):
        code = "\n".join(stmt for _, stmt in FLOOR_STEPS[: i + 1]) + (
            "\nimport resource, sys, json\nprint(json.dumps({'peak_mb': resource.getrusage(resource.RUSAGE_SELF)"
            ".ru_maxrss / 1024, 'heavy': [m for m in ('torch._dynamo', 'triton', 'scipy') if m in sys.modules]}))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows.append((label, json.loads(done.stdout.strip().splitlines()[-1])))
    weights_mb = sum(f.stat().st_size for f in Path(_default_model_dir()).glob("*.safetensors")) / 2**20
    floor = rows[-1][1]["peak_mb"]
    lines = [FLOOR_TITLE, "", _header("python benchmarks/scale.py --part import-floor"), "",
             "Peak RSS of a fresh `python -c` that runs the imports up to that row and nothing else:", "",
             "| imports | peak RSS MB | heavy modules loaded |", "|---|---|---|"]
    lines += [f"| {label} | {r['peak_mb']:.0f} | {', '.join(r['heavy']) or '—'} |" for label, r in rows]
    lines += ["", f"Lower bound for the streaming goal of issue 20: an in-memory path also holds the fp32 weights of "
                  f"SmolLM2-135M ({weights_mb:.0f} MB), so it peaks at ≥ {floor + weights_mb:.0f} MB; 40 % of that is "
                  f"{0.4 * (floor + weights_mb):.0f} MB, {'below' if 0.4 * (floor + weights_mb) < floor else 'above'} "
                  f"the {floor:.0f} MB the imports alone hold."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(FLOOR_TITLE, text)


def _default_model_dir():
    from hf_compress.models import default_model_dir

    return default_model_dir()


def larger_than_ram(args) -> None:
    from transformers import LlamaConfig

    from hf_compress.models import default_model_dir

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    hidden, inter, vocab = 5120, 13824, 49152
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = math.ceil((args.gib * 2**30 / 2 - 2 * vocab * hidden) / per_layer)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=40,
                         num_key_value_heads=40, vocab_size=vocab, tie_word_embeddings=False,
                         max_position_embeddings=4096)
    tmp = Path(args.workdir) / "hfc-large" if args.workdir else Path(tempfile.mkdtemp(prefix="hfc-large-"))
    try:
        record = tmp / "src" / "synthetic.json"  # a complete synthetic checkpoint from an interrupted run is reused
        if record.is_file() and json.loads(record.read_text())["layers"] == layers:
            total, write_s = (json.loads(record.read_text())[k] for k in ("bytes", "seconds"))
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            t = time.perf_counter()
            total = write_synthetic(tmp / "src", config, default_model_dir())
            write_s = time.perf_counter() - t
            record.write_text(json.dumps({"layers": layers, "bytes": total, "seconds": write_s}))
        print(f"wrote {total / 2**30:.1f} GiB in {write_s:.0f} s", flush=True)
        for stale in ("rtn", "gptq", "first-blocks"):
            shutil.rmtree(tmp / stale, ignore_errors=True)
        rtn = gptq = None
        if "rtn" in args.rows:
            rtn = run_worker({"config": "RTNConfig", "kwargs": {"bits": 4, "group_size": 64, "dense_dtype": "bfloat16"},
                              "samples": 0, "mode": "streamed", "source": str(tmp / "src"), "out": str(tmp / "rtn")}, tmp)
            out_bytes = sum(f.stat().st_size for f in (tmp / "rtn").glob("*.safetensors"))
            shutil.rmtree(tmp / "rtn")
        if "gptq" in args.rows:
            few = tmp / "first-blocks"  # the same shards, a config naming only the first blocks
            few.mkdir()
            for f in (tmp / "src").iterdir():
                if f.name != "config.json":
                    os.symlink(f, few / f.name)
            config.num_hidden_layers = args.gptq_blocks
            config.save_pretrained(few)
            gptq = run_worker({"config": "GPTQConfig", "kwargs": {"bits": 4, "group_size": 64, "dense_dtype": "bfloat16"},
                               "samples": args.gptq_samples, "mode": "streamed", "source": str(few),
                               "out": str(tmp / "gptq")}, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    params = total / 2
    rtn_row = (f"| RTN 4-bit g64, all {layers} blocks, streamed | {rtn['peak_mb']:.0f} | {rtn['seconds']:.0f} | "
               f"{statistics.median(rtn['block_seconds']):.1f} | {out_bytes / 2**30:.2f} GiB |") if rtn else None
    gptq_row = (f"| GPTQ 4-bit g64, first {args.gptq_blocks} blocks, {args.gptq_samples} × 512 calibration tokens, streamed | "
                f"{gptq['peak_mb']:.0f} | {gptq['seconds']:.0f} | "
                f"{', '.join(f'{s:.0f}' for s in gptq['block_seconds']) or '—'} (block 0 at {gptq['first_block_at']:.0f} s) "
                f"| — |") if gptq else None
    if not (rtn and gptq):  # one run: print its row, keep the section's other row as measured before
        print(f"wrote {total / 2**30:.1f} GiB in {write_s:.0f} s ({params / 1e9:.1f} B parameters, {layers} blocks)")
        print(rtn_row or gptq_row, json.dumps(rtn or gptq))
        return
    lines = [LARGE_TITLE, "", _header(f"python benchmarks/scale.py --part larger-than-ram --gib {args.gib} "
                                      f"--gptq-blocks {args.gptq_blocks} --gptq-samples {args.gptq_samples}"), "",
             f"A random Llama checkpoint of {params / 1e9:.1f} B parameters ({layers} blocks, hidden {hidden}, MLP "
             f"{inter}, untied {vocab}-token embeddings and head) in bf16: {total / 2**30:.1f} GiB of weights on a "
             f"machine with {ram / 2**30:.1f} GiB of RAM (fp32, as quantization computes, it would be "
             f"{2 * total / 2**30:.0f} GiB). Written shard by shard in {write_s:.0f} s; deleted afterwards.", "",
             "| run | peak RSS MB | seconds | median s/block | output |", "|---|---|---|---|---|", rtn_row, gptq_row]
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(LARGE_TITLE, text)
