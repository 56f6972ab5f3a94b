"""Small pretrained bases for the training-heavy claims (issue 24): a Llama (RMSNorm, SwiGLU, RoPE) and a GPT-2,
both character-level, pretrained from scratch on TinyShakespeare, on one CPU thread, in minutes.

SmolLM2-135M is too large to uptrain or fine-tune to convergence on a 2-core machine; these two models are
small enough that every training claim (recursive uptraining, early exit, LN removal, LISA) can run until its
curve flattens. Data: TinyShakespeare, the first 90 % of the characters for training (seeded random windows),
the last 10 % held out (the same split as ``hf_compress.methods.ln_free.small_gpt2``; nothing is committed).

Training is a plain loop (AdamW, warmup + cosine to 10 %, clip 1.0, no dropout) that writes a checkpoint every
``--ckpt-every`` steps: the weights with ``save_pretrained`` (safetensors) and the AdamW moments in a second
safetensors file — never a pickle. Batches are a pure function of (seed, step) and there is no dropout, so a
run that is killed and started again resumes from its last checkpoint and ends with exactly the weights of an
uninterrupted run (``tests/test_small_base.py`` kills one with SIGKILL and compares). The finished model is
saved with its tokenizer and ``training.json`` (the held-out curve) in
``~/.cache/hf_compress/small_base/<name>/`` and loads with ``AutoModelForCausalLM.from_pretrained``.

    nohup nice -n 5 python benchmarks/small_base.py --arch llama > /work/logs/small_base_llama.log 2>&1 &
    python benchmarks/small_base.py --arch gpt2          # the GPT-2 twin (same width, depth, data and budget)
    python benchmarks/small_base.py --plot              # loss PNG + RESULTS.md section from the caches

Running the same command again after a kill resumes; after completion it only prints the cached result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(os.environ.get("HF_COMPRESS_SMALL_BASE", Path.home() / ".cache" / "hf_compress" / "small_base"))


@dataclass(frozen=True)
class Spec:
    arch: str = "llama"          # llama | gpt2
    layers: int = 8
    d: int = 128
    heads: int = 4
    ffn: int = 352               # SwiGLU width (≈ 8/3·d, the Llama ratio); GPT-2 uses 4·d
    block: int = 128
    batch: int = 16
    steps: int = 2500
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    eval_every: int = 250
    ckpt_every: int = 250
    eval_windows: int = 64

    @property
    def name(self) -> str:
        base = SPECS[self.arch]
        diff = "-".join(f"{k}{v}" for k, v in asdict(self).items() if getattr(base, k) != v)
        return f"{self.arch}-{self.layers}L{self.d}d" + (f"-{diff}" if diff else "")


SPECS = {"llama": Spec(), "gpt2": Spec(arch="gpt2")}


def build_model(spec: Spec, vocab_size: int):
    """A freshly initialised model of ``spec`` (seeded)."""
    torch.manual_seed(spec.seed)
    if spec.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=vocab_size, hidden_size=spec.d, intermediate_size=spec.ffn,
                             num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                             num_key_value_heads=spec.heads, max_position_embeddings=spec.block,
                             tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        return LlamaForCausalLM(config)
    if spec.arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=vocab_size, n_positions=spec.block, n_embd=spec.d, n_layer=spec.layers,
                            n_head=spec.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=None, eos_token_id=None)
        return GPT2LMHeadModel(config)
    raise ValueError(f"arch must be 'llama' or 'gpt2', got {spec.arch!r}")


def data(text: str | None = None):
    """``(tokenizer, train ids, held-out ids)`` for TinyShakespeare (or ``text``), character level."""
    from hf_compress.methods.ln_free.small_gpt2 import char_tokenizer, data_path, split_ids

    text = data_path().read_text(encoding="utf-8") if text is None else text
    tok = char_tokenizer(text)
    train, held = split_ids(tok, text)
    return tok, train, held


def batch_at(ids: torch.Tensor, step: int, block: int, batch: int, seed: int) -> torch.Tensor:
    """The training batch of ``step``: a pure function of (seed, step), so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(ids) - block, (batch,), generator=g).tolist()
    return torch.stack([ids[s: s + block] for s in starts])


@torch.no_grad()
def heldout_ce(model, ids: torch.Tensor, block: int = 128, max_windows: int = 64) -> float:
    """Mean next-token CE (nats/char) over the first ``max_windows`` non-overlapping held-out windows."""
    n = min(len(ids) // block, max_windows)
    windows = ids[: n * block].view(n, block)
    was = model.training
    model.eval()
    total = sum(float(model(input_ids=c, labels=c, use_cache=False).loss) * len(c) for c in windows.split(16))
    model.train(was)
    return total / n


def lr_at(spec: Spec, step: int) -> float:
    """Linear warmup, then cosine from ``lr`` down to 10 % of it at ``steps``."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# --- checkpoints: weights via save_pretrained, AdamW moments via safetensors, the rest as JSON ---------------

def save_checkpoint(directory: Path, model, optimizer, state: dict) -> None:
    """Atomically replace ``directory`` with the weights, optimizer moments and loop state."""
    from safetensors.torch import save_file

    from hf_compress.checkpoint.atomic import atomic_directory

    # keys "<index in the optimizer's own parameter order>.<exp_avg|exp_avg_sq|step>"
    tensors = {f"{i}.{key}": value.detach().clone().contiguous()
               for i, s in optimizer.state_dict()["state"].items() for key, value in s.items()}
    with atomic_directory(directory, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))


def load_checkpoint(directory: Path, spec: Spec, vocab_size: int):
    """``(model, optimizer, state)`` from a checkpoint written by :func:`save_checkpoint`."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    optimizer = make_optimizer(model, spec)
    moments = load_file(str(directory / "optimizer.safetensors"))
    per_param: dict[int, dict] = {}
    for key, value in moments.items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = value
    sd = optimizer.state_dict()
    sd["state"] = per_param
    optimizer.load_state_dict(sd)
    return model, optimizer, json.loads((directory / "trainer_state.json").read_text())


def make_optimizer(model, spec: Spec):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.99))


def train(spec: Spec, out: Path | None = None, text: str | None = None, kill_after: int | None = None,
          log=print) -> Path:
    """Pretrain ``spec`` into ``out`` (default ``ROOT/spec.name``), resuming from ``out/checkpoint`` if present.

    ``kill_after=k`` sends SIGKILL to this process after step k (no cleanup runs: the resume test's real kill).
    Returns ``out``; a finished folder is returned at once.
    """
    out = Path(out or ROOT / spec.name)
    if (out / "training.json").is_file():
        return out
    tok, train_ids, held = data(text)
    ckpt = out / "checkpoint"
    if (ckpt / "trainer_state.json").is_file():
        model, optimizer, state = load_checkpoint(ckpt, spec, len(tok))
        log(f"resumed at step {state['step']} from {ckpt}")
    else:
        model = build_model(spec, len(tok))
        optimizer = make_optimizer(model, spec)
        state = {"step": 0, "spec": asdict(spec), "train": [], "heldout": [], "seconds": 0.0}
    model.train()
    t0, running = time.perf_counter(), []
    for step in range(state["step"], spec.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(spec, step)
        batch = batch_at(train_ids, step, spec.block, spec.batch, spec.seed)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(float(loss.detach()))
        done = step + 1
        if done % spec.eval_every == 0 or done == spec.steps:
            state["train"].append([done, round(sum(running) / len(running), 4)])
            state["heldout"].append([done, round(heldout_ce(model, held, spec.block, spec.eval_windows), 4)])
            running = []
            log(f"step {done}/{spec.steps} train {state['train'][-1][1]} held-out {state['heldout'][-1][1]} "
                f"({time.perf_counter() - t0:.0f} s this session)")
        if done % spec.ckpt_every == 0 or done == spec.steps:
            state["step"] = done
            state["seconds"] = round(state["seconds"] + time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            save_checkpoint(ckpt, model, optimizer, state)
        if kill_after is not None and done == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    return finish(out, model, tok, state, spec)


def finish(out: Path, model, tok, state: dict, spec: Spec) -> Path:
    """Save the final model with its tokenizer and curve next to the checkpoint (``training.json`` last)."""
    import shutil

    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    curve = state["heldout"]
    quarter = [c for s, c in curve if s >= 0.75 * spec.steps]
    info = {**state, "tokens_seen": spec.steps * spec.batch * spec.block,
            "params": sum(p.numel() for p in model.parameters()),
            "heldout_final": curve[-1][1] if curve else None,
            # how much the held-out CE still fell over the last quarter of the steps: "flat" when < 0.02 nats
            "last_quarter_drop": round(quarter[0] - quarter[-1], 4) if len(quarter) > 1 else None}
    (out / "training.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return out


def load(arch: str = "llama", spec: Spec | None = None, train_if_missing: bool = False):
    """``(model, tokenizer, train ids, held-out ids, training info)`` of a cached small base."""
    from transformers import AutoModelForCausalLM

    spec = spec or SPECS[arch]
    path = ROOT / spec.name
    if not (path / "training.json").is_file():
        if not train_if_missing:
            raise FileNotFoundError(f"no small base at {path}: run python benchmarks/small_base.py --arch {arch}")
        train(spec, path)
    tok, train_ids, held = data()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok, train_ids, held, json.loads((path / "training.json").read_text())


def plot(png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arch, spec in SPECS.items():
        f = ROOT / spec.name / "training.json"
        if f.is_file():
            info = json.loads(f.read_text())
            for key, style in (("train", ":"), ("heldout", "-")):
                xs, ys = zip(*info[key])
                ax.plot([x * spec.batch * spec.block / 1e6 for x in xs], ys, style, label=f"{arch} {key}")
    ax.set_xlabel("training tokens (M chars)")
    ax.set_ylabel("CE (nats/char)")
    ax.set_title("small bases: pretraining on TinyShakespeare")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def write_results() -> None:
    """The "Small pretrained bases" section of RESULTS.md from the cached ``training.json`` files."""
    import platform
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _results import write_section
    from quantization import versions

    title = "## Small pretrained bases (Llama and GPT-2, char-level TinyShakespeare)"
    lines = [title, "", f"Command: `nice -n 5 python benchmarks/small_base.py --arch llama` (and `--arch gpt2`) · "
             f"{platform.machine()}, {os.cpu_count()} CPU cores, 1 torch thread, shared with other jobs · {versions()} · "
             f"trained {trained_dates()}. Own loop: AdamW "
             "(0.9, 0.99), warmup + cosine to 10 %, wd 0.1 on matrices, clip 1.0, no dropout; checkpoints every 250 "
             "steps (safetensors weights + AdamW moments), resumable (`tests/test_small_base.py`: a SIGKILLed run "
             "resumes to bit-identical weights). Held-out: mean CE (nats/char) on the first 64 × 128 chars of the last "
             "10 % of TinyShakespeare. Curves: `benchmarks/small_base_loss.png`.", "",
             "| base | parameters | steps | batch × block | chars seen | lr | held-out CE: step 250 → final | "
             "drop over the last quarter / last 250 steps | flattened (last quarter < 0.02 nats) | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arch, spec in SPECS.items():
        f = ROOT / spec.name / "training.json"
        if not f.is_file():
            lines.append(f"| {arch} | not measured (not trained yet: `python benchmarks/small_base.py --arch {arch}`) "
                         "| | | | | | | | |")
            continue
        info = json.loads(f.read_text())
        drop = info["last_quarter_drop"]
        lines.append(f"| {arch} ({spec.layers}L, d {spec.d}, {spec.heads} heads) | {info['params']:,} | {spec.steps} | "
                     f"{spec.batch} × {spec.block} | {info['tokens_seen']:,} | {spec.lr} | {info['heldout'][0][1]} → "
                     f"{info['heldout_final']} | {drop:+.4f} / {info['heldout'][-2][1] - info['heldout'][-1][1]:+.4f} | {'yes' if drop is not None and drop < 0.02 else 'no'} | "
                     f"{info['seconds']:.0f} |")
    write_section(title, "\n".join(lines) + "\n")


def trained_dates() -> str:
    """When each cached base finished training (its training.json's date)."""
    import datetime

    dates = [f"{arch} {datetime.date.fromtimestamp((ROOT / spec.name / 'training.json').stat().st_mtime)}"
             for arch, spec in SPECS.items() if (ROOT / spec.name / "training.json").is_file()]
    return ", ".join(dates) or "not yet"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(SPECS), default="llama")
    parser.add_argument("--steps", type=int, help="override the step budget (a different cache folder)")
    parser.add_argument("--out", type=Path, help="output folder (default ~/.cache/hf_compress/small_base/NAME)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, d 32 model for tests")
    parser.add_argument("--text", type=Path, help="train on this text file instead of TinyShakespeare")
    parser.add_argument("--kill-after", type=int, help="SIGKILL this process after that step (resume test)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", action="store_true",
                        help="only draw benchmarks/small_base_loss.png and write the RESULTS.md section")
    args = parser.parse_args(argv)
    if args.plot:
        plot(Path(__file__).resolve().parent / "small_base_loss.png")
        write_results()
        return
    torch.set_num_threads(args.threads)
    spec = SPECS[args.arch]
    if args.tiny:
        spec = replace(spec, layers=2, d=32, heads=2, ffn=64, block=32, batch=4, steps=6, warmup=2,
                       eval_every=2, ckpt_every=2, eval_windows=4)
    if args.steps:
        spec = replace(spec, steps=args.steps)
    text = args.text.read_text(encoding="utf-8") if args.text else None
    out = train(spec, args.out, text=text, kill_after=args.kill_after, log=lambda m: print(m, flush=True))
    print(out, (out / "training.json").read_text().splitlines()[0:3], flush=True)


if __name__ == "__main__":
    main()
