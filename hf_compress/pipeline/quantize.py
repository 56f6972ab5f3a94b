"""``quantize(model, config, calibration)``: the one pipeline every quantization method runs through, and the one
``HfQuantizer`` that loads its checkpoints.

The stages, in order, each a call into its own subpackage; the config (a method's ``HfcConfig``) decides the
method-specific parts through its hooks and never the other way round:

1. ``config.prepare_model`` — option-group transforms (e.g. rotation);
2. *calibrate* — ``calibration.calibration_batches`` when the method needs data;
3. *score + allocate* — ``config.resolve_plan`` (methods call ``sensitivity`` and ``allocation``);
4. *solve* — ``config.solve`` per module, fed block by block by ``calibration.run_sequential`` (with the config's
   token weights) or weight-only;
5. *pack* — ``formats.PackedLinear`` in place;
6. *save/load* — the config, now holding the plan and a report, becomes the model's ``quantization_config`` and an
   ``HfcQuantizer`` is attached, so ``save_pretrained`` writes a checkpoint that loads natively.

Pre-quantized load: on the meta device each planned module becomes an empty ``PackedLinear``
(``checkpoint.rebuild``), then transformers fills it. Quantize-on-load: the dense weights load, then ``quantize``.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.quantizers.base import HfQuantizer

from hf_compress.calibration.data import calibration_batches, is_pretokenized
from hf_compress.calibration.discovery import (decoder_layers, max_positions, model_family, set_submodule,
                                               unsupported_weight_modules, weight_matrix)
from hf_compress.calibration.distributed import same_everywhere, shard
from hf_compress.calibration.runner import run_sequential
from hf_compress.checkpoint.rebuild import check_mixed_segments
from hf_compress.checkpoint.verify import check_packed_tensors, verify_checkpoint_files
from hf_compress.config import HfcConfig
from hf_compress.formats.embedding import PackedEmbedding
from hf_compress.formats.linear import PackedLinear
from hf_compress.plan import overall_bits, plan_rows
from hf_compress.registry import resolve
from hf_compress.solvers.rtn import rtn_quantize

logger = logging.getLogger(__name__)


def _bias_of(module: nn.Module):
    return None if getattr(module, "bias", None) is None else module.bias.detach()


def _packed_from(name: str, module: nn.Module, config: HfcConfig, plan: dict, stats, report: dict,
                 weight_only: bool = False) -> PackedLinear:
    if isinstance(module, nn.Embedding):
        return _packed_embedding(name, module, plan[name], report)
    W = weight_matrix(module).detach()
    if not torch.isfinite(W).all():
        raise ValueError(f"weights of {name} contain NaN or inf; refusing to quantize them")
    result = rtn_quantize(W, plan[name]) if weight_only else config.solve(W, stats, plan[name], name=name)
    spec = result.spec or plan[name]
    if spec.is_mixed and spec != plan[name]:
        raise ValueError(f"{name}: the solver stored bit groups {spec.bit_groups}, the plan asked for {plan[name].bit_groups}")
    packed = PackedLinear.from_codes(result.codes, result.scales, result.zeros, spec, _bias_of(module), result.col_bits)
    packed.to(W.device)
    report[name] = {"output_error": result.output_error}
    return packed


def _packed_embedding(name: str, module: nn.Embedding, spec, report: dict) -> PackedEmbedding:
    """An embedding table is solved weight-only (rows are looked up, not multiplied: no Hessian applies)."""
    W = module.weight.detach()
    if not torch.isfinite(W).all():
        raise ValueError(f"weights of {name} contain NaN or inf; refusing to quantize them")
    result = rtn_quantize(W, spec)
    packed = PackedEmbedding.from_embedding_codes(result.codes, result.scales, result.zeros, spec,
                                                  padding_idx=module.padding_idx, dtype=W.dtype)
    report[name] = {"output_error": result.output_error}
    return packed.to(W.device)


def quantize(model: nn.Module, config: HfcConfig, calibration=None, tokenizer=None, progress: bool = True,
             resume_dir=None, block_io=None) -> nn.Module:
    """Quantize ``model`` in place with ``config`` and return it.

    Args:
        model: a transformers causal LM (any architecture whose decoder blocks sit in one ``ModuleList``).
        config: an :class:`HfcConfig` subclass instance (e.g. ``GPTQConfig(bits=4, group_size=64)``).
        calibration: calibration source or :class:`CalibrationSpec`; defaults to ``config.dataset``.
            Ignored by methods that need no data.
        tokenizer: tokenizer for the calibration text (default: loaded from ``model.name_or_path``).
        resume_dir: a folder for the run's state after every calibrated block; a run killed part-way restarts
            there from the last finished block (same config, model and data, else ValueError). Removed on success.
        block_io: set by :func:`hf_compress.quantize_streaming`: the decoder blocks are on the meta device and get
            their weights one at a time (``load``), each written and freed once solved (``release``).
    """
    if not isinstance(config, HfcConfig):
        raise TypeError(f"config must be an hf-compress config (e.g. GPTQConfig), got {type(config).__name__}")
    if config.pipeline is not None:  # the method runs its own stages (see HfcConfig.pipeline)
        if resume_dir is not None or block_io is not None:
            raise ValueError(f"{type(config).__name__} supports neither resume_dir nor streaming yet")
        return resolve(config.pipeline)(model, config, calibration=calibration, tokenizer=tokenizer, progress=progress)
    if getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is not None:
        raise ValueError("model is already quantized; load the dense model to quantize it again")
    config.check_model(model)
    start = time.perf_counter()
    batches = calibration_windows(model, config, calibration, tokenizer)
    if batches is not None:
        batches = shard(batches)  # this process's windows (all, in one process)
    token_weights = config.token_weights()  # validated before the model is touched
    if block_io is not None:
        _check_streamable(model, config, resume_dir)
    else:
        config.prepare_model(model)
    plan = config.resolve_plan(model, batches)
    # across processes: rank 0's plan and planner state (e.g. per-column assignments) everywhere
    plan, planner_state = same_everywhere((plan, dict(vars(config))))
    vars(config).update(planner_state)
    _, layers = decoder_layers(model)
    skipped = unsupported_weight_modules(layers)
    if skipped:
        logger.warning("hf-compress: %d modules have weights no solver handles and stay dense: %s", len(skipped), skipped)
    state = None
    if resume_dir is not None and config.solver_needs_statistics:
        from hf_compress.calibration.resume import ResumeState

        state = ResumeState(resume_dir, config.to_dict(), model, batches)
    report: dict[str, dict] = {} if state is None else state.report

    def solve(name, module, stats):
        return _packed_from(name, module, config, plan, stats, report)

    head, table = config.head_module_name(model), config.embedding_module_name(model)
    if head is not None or table is not None:
        if table is not None and head is None and _is_tied(model):
            warnings.warn("embedding_bits on a model whose head shares the embedding matrix: the head is untied and "
                          "stays dense, so the checkpoint holds the dense matrix plus the packed table and grows; set "
                          "head_bits too to pack both", stacklevel=2)
        _untie_head(model)
    if config.solver_needs_statistics:
        run_sequential(model, batches, lambda name, _m: name in plan, solve, progress=progress, token_weights=token_weights,
                       state=state, block_io=block_io)
        for name in [n for n in plan if n in (head, table)]:  # outside the blocks: no calibrated statistics reach them
            set_submodule(model, name, _packed_from(name, model.get_submodule(name), config, plan, None, report,
                                                    weight_only=True))
    elif block_io is not None:
        _solve_weight_only_by_block(model, plan, solve, block_io, progress)
    else:
        for name in tqdm(list(plan), desc="Quantizing modules", disable=not progress):
            set_submodule(model, name, solve(name, model.get_submodule(name), None))
    missing = [n for n in plan if not isinstance(model.get_submodule(n), PackedLinear)]
    if missing:
        raise ValueError(f"planned modules were never quantized (not reached by calibration?): {missing[:5]}")
    if config.dense_dtype is not None:
        cast_dense_parts(model, getattr(torch, config.dense_dtype))
    config.plan = {k: v.to_dict() for k, v in plan.items()}
    code_bits, bits = overall_bits(plan_rows(model))
    config.report = {"seconds": round(time.perf_counter() - start, 2), "code_bits": round(code_bits, 4),
                     "bits_per_weight": round(bits, 4), "skipped": skipped, "modules": report}
    attach_quantizer(model, config)
    if state is not None:
        state.finish()
    return model


def _check_streamable(model: nn.Module, config: HfcConfig, resume_dir) -> None:
    """Streaming holds one block at a time: refuse what needs all of them at once, before any work is done."""
    if resume_dir is not None:
        raise ValueError("resume_dir and streaming cannot be combined yet: a streamed run writes its blocks into the "
                         "checkpoint as it goes; rerun it from the start, or quantize in memory with resume_dir")
    if config.plan_needs_whole_model:
        raise ValueError(f"{type(config).__name__} plans from sensitivity scores of the whole model, which streaming "
                         "never holds at once; quantize in memory, or pass an explicit `plan=` (e.g. one saved by an "
                         "in-memory run) to stream it")
    refusal = (f"{type(config).__name__}'s options transform the weights before planning (a rotation), which needs "
               "the whole model in memory; quantize in memory instead")
    before = {n: (id(t), t._version) for n, t in model.state_dict(keep_vars=True).items()}
    try:
        config.prepare_model(model)  # option groups that transform weights need every block at once
    except (RuntimeError, NotImplementedError) as exc:  # it read values of the blocks, which are on the meta device
        if "meta" not in str(exc):
            raise
        raise ValueError(refusal) from exc
    after = {n: (id(t), t._version) for n, t in model.state_dict(keep_vars=True).items()}
    if before != after:
        raise ValueError(f"{refusal} (changed: {[n for n in after if before.get(n) != after[n]][:3]})")


def _solve_weight_only_by_block(model: nn.Module, plan: dict, solve, block_io, progress: bool) -> None:
    """Weight-only solving in block order, each block loaded, solved, written and freed in turn."""
    prefix, layers = decoder_layers(model)
    for idx, block in enumerate(tqdm(layers, desc="Quantizing blocks", unit="block", disable=not progress)):
        names = [n for n in plan if n.startswith(f"{prefix}.{idx}.")]
        if not names:
            continue
        block_io.load(idx, block)
        for name in names:
            set_submodule(model, name, solve(name, model.get_submodule(name), None))
        block_io.release(idx, block)
    for name in [n for n in plan if not n.startswith(f"{prefix}.")]:  # head / embeddings, held in memory
        set_submodule(model, name, solve(name, model.get_submodule(name), None))


def _is_tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return head is not None and table is not None and head.weight is getattr(table, "weight", None)


def _untie_head(model: nn.Module) -> None:
    """A packed head or packed embeddings can no longer share one matrix: give the head its own and record the
    untying so loading does not tie them again."""
    if _is_tied(model):
        module = model.get_output_embeddings()
        module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=module.weight.requires_grad)
    for cfg in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


def cast_dense_parts(model: nn.Module, dtype: torch.dtype) -> None:
    """Everything outside the packed codes/scales in ``dtype`` (the checkpoint then loads in it); ``model`` may also
    be one block (streaming casts each before writing it)."""
    for module in model.modules():
        packed = isinstance(module, PackedLinear)
        if isinstance(module, PackedEmbedding):
            module.output_dtype = dtype
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buf in list(module.named_buffers(recurse=False)):
            if name in module._non_persistent_buffers_set:  # not saved (e.g. rotary frequencies): rebuilt on load
                continue
            if buf is not None and buf.is_floating_point() and not (packed and name == "scales") and buf.dtype != dtype:
                setattr(module, name, buf.to(dtype))
    if getattr(model, "config", None) is not None:
        model.config.dtype = dtype


def calibration_windows(model: nn.Module, config, calibration=None, tokenizer=None) -> torch.Tensor | None:
    """The ``[N, L]`` calibration token ids ``config`` asks for (``None`` when it needs no data), checked against
    the model's context length; the tokenizer defaults to the model's own."""
    if not config.needs_calibration:
        return None
    spec = config.calibration_spec(calibration)
    if spec is None:
        raise ValueError(f"{type(config).__name__} needs calibration data: pass `calibration=` or set `dataset=`")
    if tokenizer is None and not is_pretokenized(spec.source):
        tokenizer = _tokenizer_for(model, config)
    batches = calibration_batches(spec, tokenizer)
    check_calibration_fits(model, batches)
    return batches


def check_calibration_fits(model: nn.Module, batches: torch.Tensor) -> None:
    """Windows the model cannot take are refused (longer than its positions, ids beyond its vocabulary); an
    encoder calibrated on raw windows is warned about."""
    limit = max_positions(model)
    if limit is not None and batches.shape[1] > limit:
        raise ValueError(f"calibration seq_len {batches.shape[1]} exceeds {type(model).__name__}'s maximum of {limit} "
                         f"positions; use seq_len <= {limit}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and int(batches.max()) >= vocab:
        raise ValueError(f"calibration token id {int(batches.max())} is out of range for the model's vocabulary of "
                         f"{vocab}: were the ids made by another tokenizer?")
    if model_family(model) == "encoder":
        warnings.warn(f"{type(model).__name__} is an encoder: it is calibrated on contiguous token windows without "
                      "its special tokens ([CLS]/[SEP]) or padding, which it may never see at inference. For "
                      "statistics of its real inputs pass pre-tokenized windows (a 2-D tensor of input_ids).",
                      stacklevel=3)


def _tokenizer_for(model, config):
    from transformers import AutoTokenizer

    source = config.tokenizer or getattr(model, "name_or_path", None)
    if not source:
        raise ValueError("no tokenizer: pass `tokenizer=` or set the config's `tokenizer`")
    return AutoTokenizer.from_pretrained(source)


class HfcQuantizer(HfQuantizer):
    """Builds packed modules from a config's plan, or runs the config's method after a dense load."""

    requires_calibration = False
    serialized_names = {"weight": ["weight", "scales", "qzeros"]}

    def validate_environment(self, *args, **kwargs):
        if self.pre_quantized:
            self.quantization_config.plan_specs()  # raises if the checkpoint's config holds no plan

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if self.pre_quantized:
            stored = verify_checkpoint_files(checkpoint_files)
            for module_type in self.quantization_config.build_modules(model, dtype=model.dtype):
                check_packed_tensors(model, stored, module_type)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            check_mixed_segments(model)
            _enable_cards(model, self.quantization_config)
            return model
        model.hf_quantizer = None  # `quantize` refuses models that look quantized already
        model.is_quantized = False
        quantize(model, self.quantization_config)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        """Trainable with adapters (QLoRA-style), so ``transformers.Trainer`` accepts a packed model under PEFT.

        The packed weights are frozen buffers, but their forward is differentiable in the input, so adapters on top
        (``integrations.peft_packed``) get gradients. Training the packed weights themselves (QAT) is not supported:
        ``is_qat_trainable`` stays False, which keeps Trainer refusing a packed model without adapters.
        """
        return True


def attach_quantizer(model: nn.Module, config: HfcConfig) -> None:
    """Mark an in-memory quantized model the way ``from_pretrained`` would, so it saves natively."""
    model.hf_quantizer = HfcQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.config.quantization_config = config
    _enable_cards(model, config)


def _enable_cards(model, config) -> None:
    from hf_compress.integrations.hub import enable_hub_cards

    enable_hub_cards(model, tags=[config.quant_method.removeprefix("hfc_")])


def register() -> None:
    """Register every registered quantization method's config, and the quantizer, with transformers (idempotent)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from hf_compress.registry import methods

    for method in methods("quantization"):
        cls = method.config_class()
        AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(cls.quant_method, cls)
        AUTO_QUANTIZER_MAPPING.setdefault(cls.quant_method, HfcQuantizer)
