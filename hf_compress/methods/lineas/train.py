"""Fitting a LinEAS adapter: the end-to-end trainer (paper Alg. 1) and the locally fitted mean-shift baseline.

Both work on a ``PeftModel`` made with :class:`~hf_compress.methods.lineas.config.LineasConfig` and read the
steered modules' outputs through forward hooks, token-mean pooled per prompt:

* the *target* activations η_ℓ are computed once, through the base model (every map at strength 0, which is the
  identity exactly) and cached;
* the *source* activations ξ_ℓ are computed at every step through the *steered* model, so the map of layer ℓ sees
  what the maps upstream did to its input — the "end-to-end" of LinEAS. The loss is
  ``Σ_ℓ Σ_j W2²(ξ_ℓ·j, η_ℓ·j)`` (:func:`~hf_compress.methods.lineas.loss.lineas_loss`), followed by the proximal
  step of the sparse-group-lasso.

A forward pass stops (by an exception from the last hook) once every steered module has produced its output: the
layers after it and the LM head contribute nothing to the loss (on SmolLM2-135M the head is a fifth of the forward cost).
The loss compares sorted values across the whole batch, so it does not split over micro-batches; with more prompts
than ``micro_batch`` the exact gradient is taken in two passes (pooled activations without a graph, the loss's
gradient with respect to them, then one backward per micro-batch), which bounds memory by one micro-batch.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_compress.methods.lineas.loss import lineas_loss, pooled_mean, prox_sparse_group_
from hf_compress.methods.lineas.model import LineasModel, lineas_layers

__all__ = ["LineasTraining", "encode_prompts", "fit_mean_shift", "loss_gradients", "pooled_activations",
           "read_prompts", "train_lineas"]


@dataclass
class LineasTraining:
    """How :func:`train_lineas` fits the maps (the regulariser's weights live in ``LineasConfig``).

    Args:
        steps: optimizer steps (the paper: 1000 SGD steps at lr 0.1; Adam, the default here, is meant for runs of a
            few dozen to a few hundred steps on a CPU).
        lr: peak learning rate, decayed to 0 by a cosine schedule.
        optimizer: ``"adam"`` or ``"sgd"`` (the paper's; needs a larger ``lr``).
        batch_size: prompts drawn from each side per step; ``None`` uses all (the paper's batch = N).
        micro_batch: prompts per forward pass; the gradient is exact whatever this is (see the module doc).
        max_length: prompts are truncated to this many tokens.
        seed: seeds the batch sampling.
    """

    steps: int = 100
    lr: float = 1e-2
    optimizer: str = "adam"
    batch_size: int | None = None
    micro_batch: int = 16
    max_length: int = 64
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "micro_batch", "max_length", "seed", "batch_size"):
            value = getattr(self, name)
            if value is None and name == "batch_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
                raise ValueError(f"LinEAS training {name} must be a positive int, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"LinEAS training lr must be a finite number > 0, got {self.lr!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"LinEAS training optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# -- prompts ---------------------------------------------------------------------------------------------------------
def read_prompts(path: str | os.PathLike) -> list[str]:
    """The non-blank lines of a UTF-8 text file, one prompt each."""
    path = Path(path)
    if not path.is_file():
        raise OSError(f"prompt file {path} does not exist")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompt file {path} is not UTF-8 text: {exc}") from exc
    prompts = [line for line in lines if line]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (one prompt per non-blank line)")
    return prompts


def encode_prompts(tokenizer, texts, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``texts``, right-padded with id 0 (masked out, so the tokenizer needs no
    pad token) and truncated to ``max_length`` tokens."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"prompts must be a list of strings, got {type(texts).__name__}")
    if not texts:
        raise ValueError("no prompts given: LinEAS needs at least one source and one target prompt")
    rows = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"prompt {i} is a {type(text).__name__}, not a string")
        enc = tokenizer(text)
        ids = enc.input_ids if hasattr(enc, "input_ids") else enc["input_ids"]
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        ids = ids[0] if ids and isinstance(ids[0], list) else ids
        if not ids or not text.strip():
            raise ValueError(f"prompt {i} ({text[:40]!r}) is empty: it has no tokens to take activations from")
        rows.append(ids[:max_length])
    width = max(map(len, rows))
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
    return input_ids, mask


# -- reading the steered modules' outputs ------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by the last hook: the rest of the forward pass cannot change the loss."""


class _Capture:
    """Forward hooks on the steered modules that keep each one's token-mean pooled output (one forward pass)."""

    def __init__(self, layers, upto: int | None = None):
        self.layers = layers
        self.upto = len(layers) if upto is None else upto  # stop after this many modules ran
        self.outputs: list = []
        self.mask = None

    def __enter__(self):
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers[:self.upto])]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _hook(self, index: int):
        def hook(module, args, out):
            if self.outputs[index] is not None:
                raise ValueError("a steered module ran twice in one forward pass (a module shared between positions): "
                                 "LinEAS needs one output per steered module; name unshared target_modules")
            z = out[0] if isinstance(out, tuple) else out
            self.outputs[index] = pooled_mean(z, self.mask)
            if all(o is not None for o in self.outputs):
                raise _Stop
        return hook

    def run(self, model, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        device = next(model.parameters()).device
        self.mask, self.outputs = mask.to(device), [None] * self.upto
        try:
            model(input_ids=ids.to(device), attention_mask=self.mask, use_cache=False)
        except _Stop:
            pass
        if any(o is None for o in self.outputs):
            raise ValueError("some steered modules did not run in the forward pass; name modules on the model's path")
        return self.outputs


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def pooled_activations(model, ids: torch.Tensor, mask: torch.Tensor, micro_batch: int = 16,
                       upto: int | None = None) -> list[torch.Tensor]:
    """Token-mean pooled outputs of every steered module (n prompts × d_ℓ each), as the model is now steered."""
    layers = lineas_layers(model)
    with _Capture(layers, upto) as cap:
        parts = [cap.run(model, ids[c], mask[c]) for c in _chunks(len(ids), micro_batch)]
    return [torch.cat([p[i] for p in parts]).float() for i in range(len(parts[0]))]


@contextmanager
def _strength(layers, adapter: str, value: float):
    """Every map at strength ``value`` inside the block (0 = the base model, exactly)."""
    saved = [layer.strength[adapter] for layer in layers]
    try:
        for layer in layers:
            layer.set_strength(value, adapter)
        yield
    finally:
        for layer, s in zip(layers, saved):
            layer.set_strength(s, adapter)


def _lineas(model) -> tuple[LineasModel, str, list]:
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, LineasModel):
        raise TypeError(f"expected a PeftModel made with LineasConfig (get_peft_model(model, LineasConfig())), got "
                        f"{type(model).__name__}")
    adapter = tuner.active_adapters[0]
    layers = [layer for layer in lineas_layers(model) if adapter in layer.lineas_omega]
    return tuner, adapter, layers


# -- the end-to-end trainer ------------------------------------------------------------------------------------------
def _loss_and_backward(model, layers, ids, mask, targets, micro_batch: int) -> float:
    """The loss on this batch, its gradient accumulated into the maps (exact, in micro-batches if needed)."""
    with _Capture(layers) as cap:
        if len(ids) <= micro_batch:
            loss = lineas_loss(cap.run(model, ids, mask), targets)
            loss.backward()
            return loss.item()
        chunks = _chunks(len(ids), micro_batch)
        with torch.no_grad():
            parts = [cap.run(model, ids[c], mask[c]) for c in chunks]
        pooled = [torch.cat([p[i] for p in parts]).float().requires_grad_() for i in range(len(layers))]
        loss = lineas_loss(pooled, targets)
        grads = torch.autograd.grad(loss, pooled)
        for c in chunks:
            torch.autograd.backward(cap.run(model, ids[c], mask[c]), [g[c].to(p.dtype) for g, p in zip(grads, pooled)])
    return loss.item()


def train_lineas(model, tokenizer, source: list[str], target: list[str], training: LineasTraining | None = None,
                 progress: bool = True, **kwargs) -> dict:
    """Fit the LinEAS maps of ``model`` so that ``source`` prompts' activations match ``target`` prompts'.

    Args:
        model: a ``PeftModel`` from ``get_peft_model(base, LineasConfig(...))`` (or loaded with
            ``is_trainable=True``); its base stays frozen.
        tokenizer: the base model's tokenizer.
        source, target: unpaired prompt lists (the paper uses 32 of each).
        training: a :class:`LineasTraining`; keyword arguments build one instead.

    Returns:
        ``{"loss": [per-step loss], "initial_loss", "final_loss" (after the last step), "settings"}``.
    """
    if training is not None and kwargs:
        raise TypeError("pass either a LineasTraining or keyword arguments, not both")
    cfg = training or LineasTraining(**kwargs)
    tuner, adapter, layers = _lineas(model)
    params = [p for layer in layers for p in (layer.lineas_omega[adapter], layer.lineas_bias[adapter])]
    if not all(p.requires_grad for p in params):
        raise ValueError("the LinEAS adapter is frozen (loaded for inference): load it with "
                         "PeftModel.from_pretrained(base, path, is_trainable=True) to train it")
    config = tuner.peft_config[adapter]
    src_ids, src_mask = encode_prompts(tokenizer, source, cfg.max_length)
    tgt_ids, tgt_mask = encode_prompts(tokenizer, target, cfg.max_length)
    was_training = model.training
    model.eval()  # the base is frozen: no dropout, as in the paper
    with _strength(layers, adapter, 0.0):
        targets = pooled_activations(model, tgt_ids, tgt_mask, cfg.micro_batch)
    optimizer = (torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam" else torch.optim.SGD(params, lr=cfg.lr))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = cfg.batch_size or max(len(source), len(target))
    history = []
    try:
        with _strength(layers, adapter, 1.0):  # T itself is what is learned; the strength only scales it at inference
            for step in tqdm(range(cfg.steps), desc="LinEAS", disable=not progress):
                si = _draw(len(source), batch, gen)
                ti = _draw(len(target), batch, gen)
                loss = _loss_and_backward(model, layers, src_ids[si], src_mask[si], [t[ti] for t in targets],
                                          cfg.micro_batch)
                if not math.isfinite(loss):
                    raise ValueError(f"LinEAS loss became {loss} at step {step}: lower the learning rate")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if config.l1_penalty or config.group_penalty:
                    for layer in layers:
                        omega, bias = layer.lineas_omega[adapter], layer.lineas_bias[adapter]
                        prox_sparse_group_(omega, bias, config.l1_penalty, config.group_penalty,
                                           (_step_size(optimizer, omega), _step_size(optimizer, bias)))
                schedule.step()
                history.append(loss)
            with torch.no_grad():
                final = lineas_loss(pooled_activations(model, src_ids, src_mask, cfg.micro_batch), targets).item()
    finally:
        model.train(was_training)
    return {"loss": history, "initial_loss": history[0] if history else final, "final_loss": final,
            "settings": cfg.to_dict()}


def _step_size(optimizer, param):
    """The step size the optimizer just used for ``param``: lr (SGD) or lr / (√v̂ + ε) per coordinate (Adam)."""
    group = optimizer.param_groups[0]
    state = optimizer.state.get(param, {})
    if "exp_avg_sq" not in state:
        return group["lr"]
    step = float(state["step"])
    v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** step)
    return group["lr"] / (v_hat.sqrt() + group["eps"])


def loss_gradients(model, tokenizer, source: list[str], target: list[str], max_length: int = 64,
                   micro_batch: int = 16) -> torch.Tensor:
    """``|∂C/∂(ω, b)|`` at the current maps, every coordinate of every steered module in one vector (the maps and
    their ``.grad`` are left as they were). With Adam's prox (see ``prox_sparse_group_``) a coordinate leaves 0 only
    while its gradient exceeds ``l1_penalty``, so a quantile of this vector at the identity is a scale-free way to
    choose ``l1_penalty`` (e.g. the 0.9 quantile: about 90 % of the coordinates start switched off)."""
    _, adapter, layers = _lineas(model)
    params = [p for layer in layers for p in (layer.lineas_omega[adapter], layer.lineas_bias[adapter])]
    src_ids, src_mask = encode_prompts(tokenizer, source, max_length)
    tgt_ids, tgt_mask = encode_prompts(tokenizer, target, max_length)
    saved = [p.grad for p in params]
    was_training = model.training
    model.eval()
    try:
        with _strength(layers, adapter, 0.0):
            targets = pooled_activations(model, tgt_ids, tgt_mask, micro_batch)
        for p in params:
            p.grad = None
        with _strength(layers, adapter, 1.0):
            _loss_and_backward(model, layers, src_ids, src_mask, targets, micro_batch)
        return torch.cat([p.grad.detach().abs().flatten() for p in params])
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        model.train(was_training)


def _draw(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """All ``n`` indices when ``size >= n``, else ``size`` drawn without replacement."""
    return torch.arange(n) if size >= n else torch.randperm(n, generator=gen)[:size]


# -- the baseline ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def fit_mean_shift(model, tokenizer, source: list[str], target: list[str], max_length: int = 64,
                   micro_batch: int = 16, sequential: bool = True, progress: bool = True) -> None:
    """The local baseline: ω = 1 and ``b_ℓ = mean(η_ℓ) − mean(ξ_ℓ)`` per steered module, in closed form, with no
    end-to-end loss (a per-layer CAA/ActAdd-style steering vector on the same modules, same adapter format).

    With ``sequential=True`` layer ℓ is fitted on source activations that already went through the fitted maps of
    layers < ℓ (the "causal" estimation of Lin-AcT; a shift fitted on the unsteered model would be applied on top of
    what upstream shifts already moved); ``False`` fits every layer on the unsteered model. Costs about L/2 forward
    passes (sequential) or 2.
    """
    _, adapter, layers = _lineas(model)
    src_ids, src_mask = encode_prompts(tokenizer, source, max_length)
    tgt_ids, tgt_mask = encode_prompts(tokenizer, target, max_length)
    was_training = model.training
    model.eval()
    try:
        with _strength(layers, adapter, 0.0):
            target_means = [t.mean(0) for t in pooled_activations(model, tgt_ids, tgt_mask, micro_batch)]
            if not sequential:
                source_means = [s.mean(0) for s in pooled_activations(model, src_ids, src_mask, micro_batch)]
        for layer in layers:
            layer.lineas_omega[adapter].fill_(1.0)
            layer.lineas_bias[adapter].zero_()
        with _strength(layers, adapter, 1.0):
            for i in tqdm(range(len(layers)), desc="mean shift", disable=not progress):
                mean = source_means[i] if not sequential else \
                    pooled_activations(model, src_ids, src_mask, micro_batch, upto=i + 1)[i].mean(0)
                layers[i].lineas_bias[adapter].copy_(target_means[i] - mean)
    finally:
        model.train(was_training)
