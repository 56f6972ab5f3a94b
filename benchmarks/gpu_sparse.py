"""GPU check of 2:4 sparsity with torch's semi-structured kernels (CUDA only): correctness, then speed.

    python benchmarks/gpu_sparse.py --out DIR            # on a CUDA machine: writes DIR/gpu_sparse.json
    python benchmarks/gpu_sparse.py --write-results FILE # here: the RESULTS.md section from that JSON

1. Correctness: per Linear shape, a 2:4 mask (largest |W| of every 4), stored by hf-compress's ``SparseLinear``
   (kept values + 2-bit indices) and decompressed; ``torch.sparse.to_sparse_semi_structured`` of that weight, and
   ``F.linear`` through it against the dense fp16 product (max relative error).
2. Speed (fp16, CUDA events, median of interleaved repeats): dense ``F.linear`` vs the semi-structured one, for
   SmolLM2-135M's Linear shapes and Llama-7B's for scale, over token counts 16…4096 (1-token decode is padded by
   torch to its minimum rows, so it is reported at 16).
3. Whole model: a SmolLM2-135M-shaped Llama (seeded random weights: speed does not depend on the values; the
   100 MB weights do not travel to the GPU machine) with every decoder Linear 2:4 semi-structured vs dense fp16:
   prefill tokens/s (512 tokens) and greedy decode tokens/s (batch 1).
Refuses to run without CUDA (``--allow-cpu`` runs the correctness part on CPU as a smoke test, never recorded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TITLE = "## 2:4 sparsity on GPU (torch semi-structured kernels)"
SMOL = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
LLAMA7B = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = [16, 64, 256, 1024, 4096]


def two_four(W):
    import torch

    from hf_compress.methods.sparse.solvers import mask_from_scores

    mask = mask_from_scores(W.abs().float(), nm=(2, 4))
    return W * mask, mask


def correctness(device) -> list[dict]:
    import torch

    from hf_compress.formats.sparse import SparseLinear, SparseSpec

    rows = []
    for out_f, in_f in SMOL + LLAMA7B[:1]:
        g = torch.Generator().manual_seed(out_f + in_f)
        W = torch.randn(out_f, in_f, generator=g) * 0.02
        Wp, mask = two_four(W)
        stored = SparseLinear.from_dense(Wp, mask, SparseSpec("2:4"), dtype=torch.float16)
        dense = stored.dense_weight(torch.float16).to(device)
        row = {"shape": [out_f, in_f], "storage_exact": bool(torch.equal(dense.cpu(), Wp.half())),
               "stored_bytes": stored.stored_bytes(), "fp16_bytes": out_f * in_f * 2}
        x = torch.randn(64, in_f, generator=g).half().to(device)
        ref = torch.nn.functional.linear(x.float(), dense.float())
        if device.type == "cuda":
            try:
                Ws = torch.sparse.to_sparse_semi_structured(dense)
                y = torch.nn.functional.linear(x, Ws).float()
                row["semi_structured_rel_err"] = float((y - ref).abs().max() / ref.abs().max())
            except Exception as exc:  # reported, not hidden: which shapes the kernels refuse
                row["semi_structured_error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
    return rows


def _time(fn, iters: int) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3  # microseconds per call


def _graph_time(fn, iters: int) -> float:
    """Per-call GPU time with the calls captured in a CUDA graph: no Python/dispatch overhead between kernels."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn()
    return _time(graph.replay, max(iters // 20, 3)) / 20


def backend_speed(repeats: int) -> list[dict]:
    """Dense vs 2:4 per backend (CUTLASS, cuSPARSELt), eager and CUDA-graph timing, on a few shapes."""
    import torch
    from torch.sparse import SparseSemiStructuredTensor

    rows = []
    backends = {"cutlass": True} | ({"cusparselt": False} if torch.backends.cusparselt.is_available() else {})
    for out_f, in_f in (SMOL[0], SMOL[2], LLAMA7B[1]):
        W = (torch.randn(out_f, in_f, device="cuda") * 0.02).half()
        Wp, _ = two_four(W)
        for backend, force in backends.items():
            SparseSemiStructuredTensor._FORCE_CUTLASS = force
            try:
                Ws = torch.sparse.to_sparse_semi_structured(Wp)
            except Exception as exc:
                rows.append({"shape": [out_f, in_f], "backend": backend, "error": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            for m in (16, 256, 4096):
                x = torch.randn(m, in_f, device="cuda").half()
                row = {"shape": [out_f, in_f], "backend": backend, "tokens": m}
                for mode, timer in (("eager", _time), ("graph", _graph_time)):
                    try:
                        d = statistics.median(timer(lambda: torch.nn.functional.linear(x, Wp), 100) for _ in range(repeats))
                        s = statistics.median(timer(lambda: torch.nn.functional.linear(x, Ws), 100) for _ in range(repeats))
                        row[mode] = {"dense_us": round(d, 2), "sparse_us": round(s, 2), "speedup": round(d / s, 3)}
                    except Exception as exc:
                        row[mode] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                rows.append(row)
    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    return rows


def layer_speed(repeats: int) -> list[dict]:
    import torch

    rows = []
    for out_f, in_f in SMOL + LLAMA7B:
        W = (torch.randn(out_f, in_f, device="cuda") * 0.02).half()
        Wp, _ = two_four(W)
        try:
            Ws = torch.sparse.to_sparse_semi_structured(Wp)
        except Exception as exc:
            rows.append({"shape": [out_f, in_f], "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        for m in TOKENS:
            x = torch.randn(m, in_f, device="cuda").half()
            times = {"dense": [], "sparse": []}
            iters = 200 if m <= 256 else 50
            try:
                for _ in range(repeats):
                    times["dense"].append(_time(lambda: torch.nn.functional.linear(x, Wp), iters))
                    times["sparse"].append(_time(lambda: torch.nn.functional.linear(x, Ws), iters))
            except Exception as exc:
                rows.append({"shape": [out_f, in_f], "tokens": m, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            d, s = statistics.median(times["dense"]), statistics.median(times["sparse"])
            rows.append({"shape": [out_f, in_f], "tokens": m, "dense_us": round(d, 2), "sparse_us": round(s, 2),
                         "speedup": round(d / s, 3)})
    return rows


def model_speed(repeats: int) -> dict:
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(cfg).half().cuda().eval()
    torch.manual_seed(0)
    sparse = LlamaForCausalLM(cfg).half().cuda().eval()
    with torch.no_grad():
        for layer in sparse.model.layers:
            for mod in layer.modules():
                if isinstance(mod, torch.nn.Linear):
                    Wp, _ = two_four(mod.weight.data)
                    mod.weight = torch.nn.Parameter(torch.sparse.to_sparse_semi_structured(Wp), requires_grad=False)
    ids = torch.randint(0, 49152, (1, 512), device="cuda")
    out = {"prefill_tok_s": {}, "decode_tok_s": {}}
    times = {k: {"prefill": [], "decode": []} for k in ("dense", "sparse")}
    with torch.no_grad():
        for m in (dense, sparse):
            m(ids)
            m.generate(ids[:, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        for _ in range(repeats):
            for name, m in (("dense", dense), ("sparse", sparse)):
                torch.cuda.synchronize()
                t = time.perf_counter()
                m(ids)
                torch.cuda.synchronize()
                times[name]["prefill"].append(time.perf_counter() - t)
                t = time.perf_counter()
                m.generate(ids[:, :8], max_new_tokens=64, min_new_tokens=64, do_sample=False)
                torch.cuda.synchronize()
                times[name]["decode"].append(time.perf_counter() - t)
    for name in times:
        out["prefill_tok_s"][name] = round(512 / statistics.median(times[name]["prefill"]), 1)
        out["decode_tok_s"][name] = round(64 / statistics.median(times[name]["decode"]), 1)
    return out


def measure(out_dir: Path, repeats: int, allow_cpu: bool, args_only_backends: bool = False) -> None:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    if not cuda and not allow_cpu:
        sys.exit("no CUDA device: torch's semi-structured sparse kernels are CUDA-only; nothing measured")
    device = torch.device("cuda" if cuda else "cpu")
    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "device": torch.cuda.get_device_name() if cuda else "cpu (smoke test)"}
    result["correctness"] = correctness(device)
    print(json.dumps(result["correctness"]), flush=True)
    if cuda:
        result["cusparselt"] = bool(torch.backends.cusparselt.is_available())
        result["backends"] = backend_speed(repeats)
        print(json.dumps(result["backends"]), flush=True)
        if args_only_backends:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "gpu_sparse_backends.json").write_text(json.dumps(result, indent=1))
            return
        result["layers"] = layer_speed(repeats)
        print(json.dumps(result["layers"]), flush=True)
        try:
            result["model"] = model_speed(repeats)
        except Exception as exc:
            result["model"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(json.dumps(result["model"]), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_sparse.json").write_text(json.dumps(result, indent=1))


def write_results(path: Path) -> None:
    from _results import write_section

    r = json.loads(path.read_text())
    lines = [TITLE, "",
             f"Command: `python benchmarks/gpu_sparse.py --out DIR` (and `--backends-only`) on {r['device']} · torch {r['torch']}, transformers "
             f"{r['transformers']}, Python {r['python']} · date: {r['date']}; section written by "
             "`python benchmarks/gpu_sparse.py --write-results benchmarks/gpu_sparse_h200.json` (the run's JSON, with the "
             "`--backends-only` run's rows merged in). Random weights (speed does not "
             "depend on the values), 2:4 by magnitude, fp16.", "",
             "Correctness (hf-compress 2:4 storage decompressed exactly; torch semi-structured `F.linear` vs dense):", "",
             "| shape (out × in) | storage exact | stored / fp16 bytes | semi-structured max rel. error |", "|---|---|---|---|"]
    for c in r["correctness"]:
        err = c.get("semi_structured_rel_err")
        lines.append(f"| {c['shape'][0]}×{c['shape'][1]} | {c['storage_exact']} | {c['stored_bytes'] / c['fp16_bytes']:.3f} | "
                     f"{f'{err:.2e}' if err is not None else c.get('semi_structured_error', 'not measured')} |")
    lines += ["", "Per-layer time (µs per call, median of interleaved repeats; speed-up = dense / sparse):", "",
              "| shape (out × in) | tokens | dense | 2:4 semi-structured | speed-up |", "|---|---|---|---|---|"]
    for row in r.get("layers", []):
        if "error" in row:
            lines.append(f"| {row['shape'][0]}×{row['shape'][1]} | {row.get('tokens', '—')} | error: {row['error']} | | |")
        else:
            lines.append(f"| {row['shape'][0]}×{row['shape'][1]} | {row['tokens']} | {row['dense_us']} | {row['sparse_us']} | "
                         f"{row['speedup']}× |")
    if r.get("backends"):
        lines += ["", "Backends (cuSPARSELt available: " + str(r.get("cusparselt")) + "); eager = as called from PyTorch, graph = "
                  "20 calls captured in a CUDA graph (kernel time without the tensor subclass's per-call dispatch):", "",
                  "| shape (out × in) | backend | tokens | eager dense / sparse µs (speed-up) | graph dense / sparse µs (speed-up) |",
                  "|---|---|---|---|---|"]
        for row in r["backends"]:
            if "error" in row:
                lines.append(f"| {row['shape'][0]}×{row['shape'][1]} | {row['backend']} | — | {row['error']} | |")
                continue
            cells = [f"{c['dense_us']} / {c['sparse_us']} ({c['speedup']}×)" if "dense_us" in c else c["error"]
                     for c in (row["eager"], row["graph"])]
            lines.append(f"| {row['shape'][0]}×{row['shape'][1]} | {row['backend']} | {row['tokens']} | {cells[0]} | {cells[1]} |")
        lines += ["", "Reading: on this H200 (sm_90) the CUTLASS semi-structured kernels refuse to run (compute capability 8.x "
                  "only) and torch's default goes to cuSPARSELt. Called eagerly, every 2:4 `F.linear` pays about 0.46 ms "
                  "of dispatch, so SmolLM2-sized layers run 20–40× slower than dense. Inside a CUDA graph the kernels "
                  "themselves are slower than dense at SmolLM2's shapes (0.35–0.83×) and faster only at Llama-7B's "
                  "11008 × 4096 with many tokens (1.10× at 256, 1.54× at 4096). No speed-up is claimed for SmolLM2."]
    m = r.get("model", {})
    if "error" in m:
        lines += ["", f"Whole SmolLM2-shaped model: error {m['error']}"]
    elif m:
        lines += ["", f"Whole SmolLM2-135M-shaped model, fp16, every decoder Linear 2:4: prefill (512 tokens) "
                  f"{m['prefill_tok_s']['sparse']} tokens/s sparse vs {m['prefill_tok_s']['dense']} dense; greedy decode "
                  f"(batch 1, 64 tokens) {m['decode_tok_s']['sparse']} vs {m['decode_tok_s']['dense']} tokens/s."]
    write_section(TITLE, "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--allow-cpu", action="store_true")
    parser.add_argument("--write-results", default=None)
    parser.add_argument("--backends-only", action="store_true", help="only the backend comparison (a short run)")
    args = parser.parse_args()
    if args.write_results:
        write_results(Path(args.write_results))
    else:
        measure(Path(args.out or "."), args.repeats, args.allow_cpu, args.backends_only)


if __name__ == "__main__":
    main()
