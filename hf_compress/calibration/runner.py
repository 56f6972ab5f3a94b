"""Sequential calibration: feed the model one decoder block at a time and collect per-module statistics.

Lifecycle for each block:
1. *discover* — one sample runs through the block with hooks that record which target modules see the same
   input tensor; consecutive modules sharing an input form a group (Llama: q/k/v → o → gate/up → down).
   Found by hooks on the block, never by tracing or by architecture names.
2. *calibrate, solve* — for each group in order, hooks accumulate ``H = 2/N · Σ xxᵀ`` for the group's modules
   while all samples run through the block (stopping as soon as the group's last module has fired), then the
   caller's solver replaces each module. Later groups therefore see the outputs of already-quantized modules
   ("true sequential").
3. *propagate* — the block runs once more and its (quantized) outputs become the next block's inputs.

Peak memory is the model's weights plus one block's activations for the calibration set, instead of every
layer's activations and statistics at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_compress.formats.linear import dequantization_cache, drop_dense_copies
from hf_compress.calibration.discovery import decoder_layers, quantizable_modules, set_submodule
from hf_compress.calibration.distributed import combine_hessian


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early once the needed statistics are in."""


@dataclass
class ModuleStats:
    """Statistics of one module's inputs over the calibration set."""

    hessian: torch.Tensor  # 2/N · Σ x xᵀ  [in, in], float32
    tokens: int = 0


def _weight_in(module: nn.Module) -> int:
    from hf_compress.calibration.discovery import weight_matrix

    return weight_matrix(module).shape[1]


def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, batches: torch.Tensor):
    """Run the model up to its first decoder block and keep each sample's ``(args, kwargs)`` there."""
    captured = []

    def grab(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for row in batches:
            try:
                model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"calibration activations entering {name} contain NaN or inf; check the model and data")


def discover_groups(block: nn.Module, targets: dict[str, nn.Module], sample) -> list[list[str]]:
    """Group target modules (relative names) by shared input tensor, in execution order."""
    order: list[tuple[str, int]] = []
    alive = []  # holding the inputs keeps their ids unique for the whole pass

    def record(name, inp):
        alive.append(inp[0])
        order.append((name, id(inp[0])))

    handles = [
        mod.register_forward_hook(lambda m, inp, out, n=name: record(n, inp))
        for name, mod in targets.items()
    ]
    try:
        with torch.no_grad():
            block(*sample[0], **sample[1])
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_input = None
    seen = set()
    for name, input_id in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and input_id == last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = input_id
    never_called = [n for n in targets if n not in seen]
    if never_called:
        groups.append(never_called)  # e.g. unused experts: solved from an empty Hessian (RTN-equivalent)
    return groups


def collect_stats(block, modules: dict[str, nn.Module], inputs, prefix: str, weights=None) -> dict[str, ModuleStats]:
    """Accumulate Hessians for ``modules`` over all samples, stopping each pass after the last one fires.

    ``weights`` (one ``[tokens]`` tensor per sample, mean 1) make it ``H = 2/N · Σ_t w_t x_t x_tᵀ`` (RSQ)."""
    stats = {n: ModuleStats(torch.zeros(_weight_in(m), _weight_in(m))) for n, m in modules.items()}
    remaining: set[str] = set()
    current: list[torch.Tensor | None] = [None]

    def hook(_m, inp, _out, name):
        x = inp[0].detach()
        _check_finite(f"{prefix}.{name}", x)
        x = x.reshape(-1, x.shape[-1]).float()
        if current[0] is not None:
            x = x * current[0].reshape(-1, 1).sqrt()
        st = stats[name]
        total = st.tokens + x.shape[0]
        st.hessian.mul_(st.tokens / total).add_(x.T @ x, alpha=2.0 / total)
        st.tokens = total
        remaining.discard(name)
        if not remaining:
            raise _StopForward

    handles = [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for i, (args, kwargs) in enumerate(inputs):
                remaining.update(modules)
                current[0] = None if weights is None else weights[i].to(torch.float32)
                try:
                    block(*args, **kwargs)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    for st in stats.values():  # across processes (calibration.distributed): the one-process statistics
        st.hessian, st.tokens = combine_hessian(st.hessian, st.tokens)
    return stats


def run_sequential(
    model: nn.Module,
    batches: torch.Tensor,
    is_target: Callable[[str, nn.Module], bool],
    solve: Callable[[str, nn.Module, ModuleStats], nn.Module | None],
    progress: bool = True,
    on_block: Callable[[int, list, list], None] | None = None,
    token_weights: Callable[[nn.Module, list], list[torch.Tensor]] | None = None,
    state=None,
    block_io=None,
) -> None:
    """Calibrate and solve ``model`` block by block.

    Args:
        model: a causal LM whose decoder blocks live in one ``nn.ModuleList``.
        batches: ``[N, L]`` calibration token ids.
        is_target: ``(full_name, module) -> bool`` chooses the modules to solve.
        solve: ``(full_name, module, stats) -> replacement or None``; called once per target module.
        on_block: ``(index, inputs, outputs)`` after each block, with the per-sample hidden states entering and
            leaving it (e.g. for block-level sensitivity such as LIM).
        token_weights: ``(block, inputs) -> [tokens] weights per sample``, computed once per block on its
            (already partially quantized) inputs and applied to every module's Hessian (RSQ's token importance).
        state: a :class:`~hf_compress.calibration.resume.ResumeState`: finished blocks are restored from it and
            every block finished here is recorded in it.
        block_io: for streaming (``pipeline.streaming``): ``load(index, block)`` gives a block on the meta device
            its weights just before it is calibrated, ``release(index, block)`` writes and frees it once finished;
            ``inputs_captured()`` once the first block's inputs are computed (the parts outside the blocks are not
            needed again until) ``blocks_done()``, after the last block.
    """
    if batches.numel() == 0:
        raise ValueError("calibration set is empty: no token windows")
    with dequantization_cache():
        _run_sequential(model, batches, is_target, solve, progress, on_block, token_weights, state, block_io)


def _run_sequential(model, batches, is_target, solve, progress, on_block, token_weights=None, state=None,
                    block_io=None):
    prefix, layers = decoder_layers(model)
    was_training = model.training
    model.eval()
    inputs = capture_block_inputs(model, layers, batches)
    if block_io is not None:
        block_io.inputs_captured()
    start = 0
    restored = None if state is None else state.restore(layers, prefix)
    if restored is not None:  # blocks up to state.done are packed again; continue with the hidden states they gave
        inputs = [_with_hidden(args, kwargs, h) for (args, kwargs), h in zip(inputs, restored)]
        start = state.done + 1
    with_targets = [i for i, block in enumerate(layers)
                    if any(is_target(f"{prefix}.{i}.{rel}", m) for rel, m in quantizable_modules(block))]
    last = with_targets[-1] if with_targets else -1  # blocks after the last target need no activations
    bar = tqdm(total=last + 1, initial=min(start, last + 1), desc="Calibrating blocks", unit="block", disable=not progress)
    try:
        for idx in range(start, last + 1):
            block = layers[idx]
            block_name = f"{prefix}.{idx}"
            if block_io is not None:
                block_io.load(idx, block)
            weights = None if token_weights is None else token_weights(block, inputs)
            for rel in _solve_block(block, block_name, inputs, is_target, solve, weights):
                bar.set_postfix_str(rel)
            with torch.no_grad():
                # Each sample's hidden state is replaced as soon as its output exists, so only one set of
                # activations is alive (two only when ``on_block`` needs the block's inputs beside its outputs).
                entering = [a[0] if a else k["hidden_states"] for a, k in inputs] if on_block is not None else None
                outputs = []
                for i, (args, kwargs) in enumerate(inputs):
                    out = _block_output(block(*args, **kwargs))
                    _check_finite(f"the output of {block_name}", out)
                    inputs[i] = _with_hidden(args, kwargs, out)
                    outputs.append(out)
                if on_block is not None:
                    on_block(idx, entering, outputs)
            drop_dense_copies(block)  # this block is done: keep only its packed codes
            if state is not None:
                state.save(idx, block, block_name, outputs)
            if block_io is not None:
                block_io.release(idx, block)
            bar.update(1)
        if block_io is not None:
            block_io.blocks_done()
    finally:
        bar.close()
        model.train(was_training)


def _solve_block(block, block_name, inputs, is_target, solve, weights=None):
    targets = {rel: m for rel, m in quantizable_modules(block) if is_target(f"{block_name}.{rel}", m)}
    if not targets:
        return
    for group in discover_groups(block, targets, inputs[0]):
        stats = collect_stats(block, {n: targets[n] for n in group}, inputs, block_name, weights)
        for rel in group:
            replacement = solve(f"{block_name}.{rel}", targets[rel], stats.pop(rel))
            if replacement is not None:
                set_submodule(block, rel, replacement)
            yield rel
