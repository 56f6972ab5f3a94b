"""Streaming quantization: models larger than RAM, one decoder block in memory at a time.

The model is built on the meta device; its embeddings, final norm and head are read from the checkpoint; then
the ordinary pipeline (``pipeline.quantize``) runs with a ``block_io`` that gives each block its weights just
before it is calibrated and, once it is solved and packed, writes it as its own shard and returns it to the meta
device. Peak memory is one fp32 block, the calibration activations and the parts outside the blocks, however
deep the model. The checkpoint holds the same tensors and the same ``quantization_config`` as quantizing in
memory and saving, and is written atomically (a failure leaves no partial folder and keeps a previous one).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from hf_compress.calibration.discovery import decoder_layers
from hf_compress.checkpoint.atomic import atomic_directory
from hf_compress.checkpoint.streaming import SafetensorsSource, ShardWriter, materialize, resolve_checkpoint_folder
from hf_compress.config import HfcConfig


class StreamedBlocks:
    """``block_io`` for the pipeline: load a block from the source, write and free it once it is done."""

    def __init__(self, model: nn.Module, source: SafetensorsSource, writer: ShardWriter, dtype: torch.dtype,
                 dense_dtype: torch.dtype | None):
        self.model, self.source, self.writer = model, source, writer
        self.dtype, self.dense_dtype = dtype, dense_dtype
        self.prefix, self.layers = decoder_layers(model)
        self.written: set[int] = set()

    def load(self, index: int, block: nn.Module) -> None:
        missing = materialize(block, f"{self.prefix}.{index}", self.source, self.dtype, self.model._init_weights)
        if missing:
            raise ValueError(f"the checkpoint has no tensors for {missing[:3]} (block {index}): streaming needs a "
                             "checkpoint whose tensor names are the model's state-dict names")

    def release(self, index: int, block: nn.Module) -> None:
        from hf_compress.pipeline.quantize import cast_dense_parts

        if self.dense_dtype is not None:
            cast_dense_parts(block, self.dense_dtype)
        prefix = f"{self.prefix}.{index}."
        self.writer.write(index, {prefix + k: v for k, v in block.state_dict().items()})
        self.written.add(index)
        block.to("meta")
        release_freed_memory()

    def inputs_captured(self) -> None:
        """The embeddings served only to compute the first block's inputs: free them until the blocks are done.

        Why: on a small model the (tied) embedding table is the largest tensor held while the blocks are
        calibrated (SmolLM2: 49152 × 576 in fp32, 113 MB, more than a whole decoder block)."""
        for module in {self.model.get_input_embeddings(), self.model.get_output_embeddings()} - {None}:
            module.to("meta")
        release_freed_memory()

    def blocks_done(self) -> None:
        """Read the embeddings back (after the last block; the head's own solve and the saving need them)."""
        missing = materialize(self.model, "", self.source, self.dtype, self.model._init_weights, skip={self.prefix})
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        if [k for k in missing if k not in tied]:
            raise ValueError(f"the checkpoint no longer holds {missing[:3]}: was it changed while quantizing?")
        self.model.tie_weights()

    def write_remaining(self) -> None:
        """Blocks the pipeline never needed (no planned module in them, or after the last one): copied as they are."""
        for index, block in enumerate(self.layers):
            if index not in self.written:
                self.load(index, block)
                self.release(index, block)


def release_freed_memory() -> None:
    """Hand memory freed by the finished block back to the OS (glibc's ``malloc_trim``).

    A block's tensors are mostly below glibc's mmap threshold, so they live in the heap, and glibc keeps freed heap
    pages: without this the process's resident size grows block after block although nothing is live. No-op where
    the C library has no ``malloc_trim`` (musl, macOS, Windows)."""
    libc = _c_library()
    if libc:
        libc.malloc_trim(0)


def return_large_frees_at_once() -> None:
    """Have glibc serve allocations of 1 MiB and more with their own mappings, which go back to the OS when freed.

    Why: glibc raises its mmap threshold each time a large block is freed (up to 32 MiB); after that a block's
    activations and solver temporaries come from the heap and stay resident once freed. Streaming exists to bound
    memory, so it pins the threshold. Process-wide, as every
    ``mallopt``; a no-op off glibc."""
    libc = _c_library()
    if libc and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_libc = None


def _c_library():
    import ctypes
    import ctypes.util

    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    return _libc


def quantize_streaming(model: str | os.PathLike, config: HfcConfig, out_dir: str | os.PathLike, calibration=None,
                       tokenizer=None, progress: bool = True, overwrite: bool = False, dtype=torch.float32) -> Path:
    """Quantize the checkpoint at ``model`` (a Hub id or a folder of safetensors) into ``out_dir`` without ever
    holding more than one decoder block's weights; returns ``out_dir``, which ``from_pretrained`` loads.

    Same arguments as :func:`hf_compress.quantize` otherwise. Refused (ValueError, before any work): planners that
    score the whole model (give them an explicit ``plan=``), weight-transforming options (rotation), resuming.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hf_compress.integrations.hub import write_card
    from hf_compress.pipeline.quantize import quantize

    if not isinstance(config, HfcConfig):
        raise TypeError(f"config must be an hf-compress config (e.g. GPTQConfig), got {type(config).__name__}")
    folder = resolve_checkpoint_folder(model)
    source = SafetensorsSource(folder)
    return_large_frees_at_once()
    model_config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    shell.name_or_path = str(folder)
    if not hasattr(shell, "_init_weights"):
        raise ValueError(f"{type(shell).__name__} has no `_init_weights`: cannot rebuild its buffers off the meta device")
    prefix, layers = decoder_layers(shell)
    missing = materialize(shell, "", source, dtype, shell._init_weights, skip={prefix})
    tied = set(getattr(shell, "all_tied_weights_keys", None) or {})
    untied_missing = [k for k in missing if k not in tied]
    if untied_missing:
        raise ValueError(f"the checkpoint in {folder} has no tensors for {untied_missing[:3]}")
    shell.tie_weights()
    still_meta = [n for n, t in shell.state_dict().items() if t.is_meta and not n.startswith(prefix + ".")]
    if still_meta:
        raise ValueError(f"could not materialize {still_meta[:3]} of {type(shell).__name__} from {folder}")
    shell.eval()
    if tokenizer is None and config.needs_calibration and config.tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    dense_dtype = getattr(torch, config.dense_dtype) if config.dense_dtype is not None else None
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, total=len(layers) + 1)
        blocks = StreamedBlocks(shell, source, writer, dtype, dense_dtype)
        quantize(shell, config, calibration=calibration, tokenizer=tokenizer, progress=progress, block_io=blocks)
        blocks.write_remaining()
        writer.write(len(layers), _outside_blocks(shell, prefix))
        writer.finish()
        shell.config.architectures = [type(shell).__name__]
        shell.config.save_pretrained(tmp)
        if shell.can_generate() and getattr(shell, "generation_config", None) is not None:
            shell.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_card(shell, tmp, repo_id=Path(out_dir).name)
    return Path(out_dir)


def _outside_blocks(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors outside the decoder blocks, without the tied copies ``save_pretrained`` leaves out."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix + "."):
            continue
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if name in tied and storage in seen:
            continue
        seen.add(storage)
        out[name] = tensor
    return out
