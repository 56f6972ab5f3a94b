"""A small character-level GPT-2 trained from scratch on TinyShakespeare, on CPU, in minutes — the model that the
LN-removal tests and benchmark work on (the paper's experiment scaled down; methods notes §7 row 3).

The last 10% of the text is held out (``heldout_ids``); training reads seeded random windows of the first 90%.
The character tokenizer is saved with the model, so ``from_pretrained`` works on the cached folder.

    python -m hf_compress.methods.ln_free.small_gpt2            # build (or reuse) the cached default model
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hf_compress.calibration.data import local_data_dir
from hf_compress.checkpoint.atomic import atomic_directory
from hf_compress.models import cache_dir

HELDOUT_FRACTION = 0.1


@dataclass(frozen=True)
class SmallGPT2Spec:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block: int = 128
    batch: int = 8
    steps: int = 1000
    lr: float = 2e-3
    warmup: int = 50
    seed: int = 0

    @property
    def name(self) -> str:
        default = SmallGPT2Spec()
        if self == default:
            return "small-gpt2-shakespeare"
        diff = "-".join(f"{k}{v}" for k, v in asdict(self).items() if getattr(default, k) != v)
        return f"small-gpt2-shakespeare-{diff}"


def data_path() -> Path:
    """TinyShakespeare: ``HF_COMPRESS_SHAKESPEARE``, else ``tinyshakespeare/input.txt`` in the local data folder."""
    env = os.environ.get("HF_COMPRESS_SHAKESPEARE")
    data = None if env else local_data_dir("tinyshakespeare")
    path = Path(env) if env else (data or Path("shared") / "data") / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        raise FileNotFoundError(f"TinyShakespeare not found at {path} (set HF_COMPRESS_SHAKESPEARE)")
    return path


def char_tokenizer(text: str):
    """A fast character-level tokenizer over the characters of ``text`` (no special tokens, no normalisation)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def split_ids(tokenizer, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids, held-out ids): the last 10% of the characters are held out."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    cut = int(len(ids) * (1 - HELDOUT_FRACTION))
    return ids[:cut], ids[cut:]


def train_batches(ids: torch.Tensor, block: int, batch: int, steps: int, seed: int):
    """``steps`` batches of ``batch`` seeded random windows of ``block`` tokens."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - block, (batch,), generator=g)
        yield torch.stack([ids[s: s + block] for s in starts.tolist()])


def heldout_loss(model, ids: torch.Tensor, block: int, max_windows: int = 64) -> float:
    """Mean next-token CE (nats) over non-overlapping held-out windows."""
    n = min(len(ids) // block, max_windows)
    windows = ids[: n * block].view(n, block)
    was = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for chunk in windows.split(16):
            total += float(model(input_ids=chunk, labels=chunk, use_cache=False).loss) * len(chunk)
    model.train(was)
    return total / n


def train_small_gpt2(path: str | os.PathLike, spec: SmallGPT2Spec = SmallGPT2Spec(), text: str | None = None) -> Path:
    """Train the small GPT-2 from scratch (AdamW, warmup + cosine) and save it with its tokenizer, atomically."""
    from transformers import GPT2Config, GPT2LMHeadModel

    text = data_path().read_text(encoding="utf-8") if text is None else text
    tok = char_tokenizer(text)
    train, held = split_ids(tok, text)
    torch.manual_seed(spec.seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=spec.block, n_embd=spec.n_embd, n_layer=spec.n_layer,
                        n_head=spec.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.99), weight_decay=0.1)

    def lr_at(step):
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - spec.warmup) / max(1, spec.steps - spec.warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    for batch in train_batches(train, spec.block, spec.batch, spec.steps, spec.seed):
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    info = {"spec": asdict(spec), "final_train_loss": round(float(loss.detach()), 4),
            "heldout_loss": round(heldout_loss(model, held, spec.block), 4)}
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(info, indent=1))
    return Path(path)


def small_gpt2(spec: SmallGPT2Spec = SmallGPT2Spec(), root: str | os.PathLike | None = None) -> Path:
    """Folder of the cached small GPT-2 for ``spec`` (trained on first use)."""
    path = Path(root or cache_dir()) / spec.name
    if not (path / "model.safetensors").is_file():
        train_small_gpt2(path, spec)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=SmallGPT2Spec.steps)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = small_gpt2(SmallGPT2Spec(steps=args.steps))
    print(path, (path / "training.json").read_text())


if __name__ == "__main__":
    main()
