"""LISA (Pan et al., arXiv 2403.17919): train the embeddings, the head and γ sampled decoder layers per interval.

The PEFT method (``get_peft_model(model, LisaConfig(...))``, :mod:`hf_compress.methods.lisa.model`) and the bare
entry points below share one schedule:

* :class:`LisaCallback` for ``transformers.Trainer`` (it drives a LISA PEFT model, or is the whole method on a
  plain model);
* :class:`LisaSchedule` for a custom (e.g. accelerate) loop on a plain model: call ``schedule.apply(step,
  optimizer)`` before the forward pass of every optimizer step (a LISA PEFT model has ``model.step(optimizer)``).

Why this is not just "toggle ``requires_grad``" (``../shared/notes/methods-architecture.md`` §2):

* The optimizer must hold *every* parameter that may ever be selected. ``Trainer.create_optimizer`` keeps only
  parameters with ``requires_grad=True`` at creation, so nothing here freezes before ``on_train_begin`` (the Trainer
  builds its optimizer before that event); a missing parameter is an error, not a silent no-op (LMFlow #726).
* PyTorch AdamW creates its moments lazily for any parameter that ever had a gradient and never frees them, so a
  plain toggle saves no optimizer memory once every layer has been visited (LMFlow #778). With
  ``release_state=True`` (the default) the moments of the sampled decoder layers are dropped at every interval
  boundary: each interval starts with fresh AdamW state, as in the paper's runs, and the state held at any time is
  that of E + H + γ layers. The embeddings, head and final norm keep theirs.
* Frozen parameters are skipped by the optimizer only if their ``.grad`` is ``None`` (``model.zero_grad()`` does
  that by default); a zero tensor would still receive weight decay and momentum.

The layers of interval ``i = step // interval_steps`` come from an RNG seeded by ``(seed, i)`` alone, so every rank
picks the same layers and a resumed run continues the same schedule without any saved state. Under an initialised
process group (``torchrun`` / ``accelerate launch``) the ranks first agree on rank 0's seed: ranks that sample with
their own seeds would freeze different layers, and DDP neither hangs nor raises on that — it averages gradients that
only some ranks computed and writes them into layers other ranks froze, so the replicas silently drift apart.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from hf_compress.calibration.discovery import decoder_layers
from hf_compress.methods.lisa.config import LisaConfig, LisaSettings, lisa_settings

__all__ = ["LisaCallback", "LisaConfig", "LisaSchedule", "LisaSettings", "seed_agreed_across_ranks"]


def _find_layers(model: nn.Module, path: str | None) -> tuple[str, nn.ModuleList]:
    """The decoder ``ModuleList``: ``path`` if given, else the largest list of repeated blocks."""
    if path is None:
        return decoder_layers(model)
    try:
        mod = model.get_submodule(path)
    except AttributeError as exc:
        raise ValueError(f"LISA layers={path!r}: no such submodule in {type(model).__name__}") from exc
    if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
        raise ValueError(f"LISA layers={path!r} must name a non-empty nn.ModuleList, got {type(mod).__name__}")
    return path, mod


@dataclass
class _Groups:
    layers: list[list[nn.Parameter]]
    always: list[nn.Parameter] = field(default_factory=list)  # E / H / final norm the user keeps trainable
    frozen: list[nn.Parameter] = field(default_factory=list)  # outside the layers, switched off


class LisaSchedule:
    """The LISA schedule on one model, usable from any training loop.

    Call :meth:`apply` at the start of every optimizer step (before the forward pass), with the number of optimizer
    steps done so far; it changes ``requires_grad`` only at interval boundaries (and on the first call). Build the
    optimizer over all parameters *before* the first call. :meth:`restore` undoes the freezing.

    Args:
        model: the model to train; only parameters with ``requires_grad=True`` now are ever made trainable.
        config: a :class:`LisaSettings` or :class:`LisaConfig`; keyword arguments build one instead.
    """

    def __init__(self, model: nn.Module, config: LisaSettings | None = None, *,
                 device: torch.device | str | None = None, **kwargs):
        if config is not None and kwargs:
            raise TypeError("pass either a LisaConfig or keyword arguments, not both")
        self.config = lisa_settings(config) if config is not None else LisaSettings(**kwargs)
        self.model = model
        self.layers_path, layer_list = _find_layers(model, self.config.layers)
        self.num_layers = len(layer_list)
        if self.config.num_active_layers > self.num_layers:
            raise ValueError(f"LISA num_active_layers={self.config.num_active_layers} exceeds the {self.num_layers} "
                             f"decoder layers found at {self.layers_path!r}")
        self._initial = {p: p.requires_grad for p in model.parameters()}
        self.groups = self._group(model, layer_list)
        self.interval: int | None = None
        self.active_layers: list[int] = []
        # a collective: every rank builds its schedule at the same point (on_train_begin, or before a custom loop)
        self._seed = seed_agreed_across_ranks(self.config.seed or 0, _collective_device(model, device))

    @property
    def seed(self) -> int:
        """The sampling seed: the configured one, or rank 0's under an initialised process group."""
        return self._seed

    def _group(self, model: nn.Module, layer_list: nn.ModuleList) -> _Groups:
        """Split the parameters into per-layer lists and E/H/norm, honouring the switches and tied weights."""
        cfg = self.config
        in_layers = {p for layer in layer_list for p in layer.parameters()}
        layers = [[p for p in layer.parameters() if self._initial[p]] for layer in layer_list]
        emb = {p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()} - in_layers
        inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        emb |= set(inp.parameters()) if inp is not None else set()
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head = set(out.parameters()) if out is not None else set()
        tied = emb & head
        if tied and cfg.train_embeddings != cfg.train_head:
            warnings.warn("LISA: the output head is tied to the input embeddings (one parameter); it stays trainable "
                          "because one of train_embeddings / train_head is True", stacklevel=3)
        groups = _Groups(layers)
        for p in model.parameters():
            if p in in_layers or not self._initial[p]:
                continue
            if p in tied:
                keep = cfg.train_embeddings or cfg.train_head
            elif p in emb:
                keep = cfg.train_embeddings
            elif p in head:
                keep = cfg.train_head
            else:
                keep = cfg.train_final_norm
            (groups.always if keep else groups.frozen).append(p)
        return groups

    def layers_for_interval(self, interval: int) -> list[int]:
        """The sorted indices of the γ layers trained in interval ``interval`` (depends on seed and interval only)."""
        rng = np.random.default_rng([self.seed, int(interval)])
        return sorted(int(i) for i in rng.choice(self.num_layers, self.config.num_active_layers, replace=False))

    def layers_for_step(self, step: int) -> list[int]:
        """The layers trained at optimizer step ``step`` (0-based count of steps already taken)."""
        return self.layers_for_interval(step // self.config.interval_steps)

    def check_optimizer(self, optimizer) -> None:
        """Raise if a parameter LISA may select is missing from ``optimizer`` (it would then never train)."""
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        held = {p for g in opt.param_groups for p in g["params"]}
        candidates = [p for ps in self.groups.layers for p in ps] + self.groups.always
        missing = sum(p.numel() for p in candidates if p not in held)
        if missing:
            raise ValueError(f"LISA: {missing:,} trainable parameter values are not in the optimizer. The optimizer "
                             "must be built over all parameters before LISA freezes any (do not freeze layers before "
                             "Trainer.train(); LisaCallback freezes in on_train_begin)")

    def apply(self, step: int, optimizer=None) -> bool:
        """Activate the layers of ``step``'s interval; returns True when the active set was (re)sampled.

        The first call with an ``optimizer`` checks that it holds every parameter LISA may select. At a new
        interval the parameters of the previous interval's layers get ``grad=None`` and, with
        ``release_state``, lose their optimizer state (fresh moments for the new interval). On the first call
        (e.g. after resuming from a checkpoint) only the state of layers outside the active set is dropped, unless
        the step is an interval boundary, so that a resumed run matches an uninterrupted one.
        """
        interval = step // self.config.interval_steps
        if interval == self.interval:
            return False
        new = self.layers_for_interval(interval)
        if self.interval is None and optimizer is not None:
            self.check_optimizer(optimizer)
        if self.interval is None:
            at_boundary = step % self.config.interval_steps == 0
            leaving = [i for i in range(self.num_layers) if at_boundary or i not in new]
        else:
            leaving = self.active_layers
        opt = getattr(optimizer, "optimizer", optimizer)
        for i in leaving:
            for p in self.groups.layers[i]:
                p.grad = None
                if opt is not None and self.config.release_state:
                    opt.state.pop(p, None)
        for i, params in enumerate(self.groups.layers):
            for p in params:
                p.requires_grad_(i in new)
        for p in self.groups.always:
            p.requires_grad_(True)
        for p in self.groups.frozen:
            p.requires_grad_(False)
            p.grad = None
        self.interval, self.active_layers = interval, new
        return True

    def restore(self) -> None:
        """Give every parameter back the ``requires_grad`` it had when the schedule was created."""
        for p, flag in self._initial.items():
            p.requires_grad_(flag)
        self.interval, self.active_layers = None, []

    def enable_all(self) -> None:
        """Make every parameter LISA may select trainable, so that an optimizer built now holds them all; the next
        :meth:`apply` freezes again (and checks that optimizer)."""
        for p in [p for ps in self.groups.layers for p in ps] + self.groups.always:
            p.requires_grad_(True)
        self.interval = None

    def reseed(self, seed: int, device: torch.device | str | None = None) -> None:
        """Sample with ``seed`` from now on (rank 0's under a process group: a collective); the next :meth:`apply`
        re-applies in full."""
        self._seed = seed_agreed_across_ranks(seed, _collective_device(self.model, device))
        self.interval = None


def _collective_device(model: nn.Module, device) -> torch.device:
    """Where a tensor for a collective must live: ``device`` if given, else the model's (NCCL needs CUDA)."""
    if device is not None:
        return torch.device(device)
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None and first.device.type != "meta" else torch.device("cpu")
    if device.type == "cpu" and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def seed_agreed_across_ranks(seed: int, device: torch.device | str = "cpu") -> int:
    """Rank 0's ``seed`` on every rank of an initialised process group (``seed`` itself outside one).

    Every DDP rank must train the same layers in every interval. A per-rank seed (``LisaCallback(seed=rank)``, or
    ``TrainingArguments(seed=base + rank)`` with ``seed=None``) would make the ranks freeze different layers; DDP
    (with ``find_unused_parameters=True``) neither hangs nor errors then: it averages gradients that only some
    ranks computed and writes them into layers that other ranks froze, so the replicas silently diverge and the
    optimizer state grows past E + H + γ layers. Differing seeds are therefore replaced by rank 0's, with a warning.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return seed
    if not 0 <= seed < 2**63:
        raise ValueError(f"LISA seed must be in [0, 2**63) to be shared between ranks, got {seed}")
    mine = torch.tensor([seed], dtype=torch.int64, device=device)
    seeds = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(seeds, mine)
    values = [int(s.item()) for s in seeds]
    if len(set(values)) > 1 and dist.get_rank() == 0:
        warnings.warn(f"LISA: the ranks were given different sampling seeds ({values}); every rank uses rank 0's "
                      f"seed {values[0]}, so that all of them train the same layers (DDP needs identical layer "
                      "sets; per-rank seeds would let the replicas drift apart)", stacklevel=3)
    return values[0]


def lisa_tuner(model):
    """The LISA tuner (``hf_compress.methods.lisa.model.LisaModel``) of a PEFT model, which may be wrapped in DDP;
    None for any other model. Recognised by its config, so that this module need not import the tuner's."""
    model = getattr(model, "module", model)
    tuner = getattr(model, "base_model", None)
    configs = getattr(tuner, "peft_config", None)
    if isinstance(configs, dict) and any(isinstance(c, LisaConfig) for c in configs.values()) and hasattr(tuner, "schedule"):
        return tuner
    return None


def optimizer_state_numel(optimizer) -> int:
    """Number of values held in the optimizer's per-parameter state (Adam moments; scalar step counters included)."""
    opt = getattr(optimizer, "optimizer", optimizer)
    return sum(v.numel() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def _refuse_sharded(args) -> None:
    """DeepSpeed ZeRO and FSDP (flat parameters) own the parameters the optimizer steps: toggling
    ``requires_grad`` after they are built neither freezes layers nor frees state (LlamaFactory PR #3103)."""
    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None \
            or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        raise ValueError("LisaCallback does not support DeepSpeed: ZeRO builds flattened, partitioned parameter "
                         "groups at initialisation, so freezing layers later neither stops their updates nor frees "
                         "their optimizer state. Train with plain DDP (ddp_find_unused_parameters=True) instead")
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise ValueError("LisaCallback does not support FSDP: FSDP shards flattened parameters built at wrap time, so "
                         "per-layer requires_grad changes during training are not honoured. Train with plain DDP "
                         "(ddp_find_unused_parameters=True) instead")


def _check_ddp(args) -> None:
    """Frozen layers produce no gradients; DDP must be told, or it waits for them and hangs or raises."""
    if getattr(args, "world_size", 1) <= 1:
        return
    find = getattr(args, "ddp_find_unused_parameters", None)
    checkpointing = bool(getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None))
    if find is False or (find is None and checkpointing):
        raise ValueError("LisaCallback under DDP needs TrainingArguments(ddp_find_unused_parameters=True): the "
                         "frozen decoder layers receive no gradient, which DDP otherwise treats as an error "
                         "('Expected to have finished reduction in the prior iteration')")


class LisaCallback(TrainerCallback, ExportableState):
    """LISA for ``transformers.Trainer``: ``Trainer(..., callbacks=[LisaCallback()])``.

    On a LISA PEFT model (``get_peft_model(model, LisaConfig(...))``) it drives that model's schedule and takes its
    settings from the model's :class:`LisaConfig` (arguments given here must agree with it). On a plain model it is
    the whole method, configured by its arguments (:class:`LisaSettings` defaults where not given).

    Nothing stays frozen while the Trainer builds its optimizer (``on_init_end`` makes every selectable parameter of
    a PEFT model trainable again; a plain model is not frozen before ``on_train_begin``), so the optimizer holds every
    layer LISA may sample. It samples in ``on_train_begin`` and ``on_step_begin`` (once per optimizer step, so
    gradient accumulation is handled); on a plain model ``on_train_end`` gives every parameter its original
    ``requires_grad`` back. Gradient checkpointing works; DDP needs ``ddp_find_unused_parameters=True``; DeepSpeed and
    FSDP are refused.

    Args: see :class:`LisaSettings`; ``None`` means "not given".
    """

    def __init__(self, num_active_layers: int | None = None, interval_steps: int | None = None, seed: int | None = None,
                 train_embeddings: bool | None = None, train_head: bool | None = None,
                 train_final_norm: bool | None = None, release_state: bool | None = None, layers: str | None = None):
        given = dict(num_active_layers=num_active_layers, interval_steps=interval_steps, seed=seed,
                     train_embeddings=train_embeddings, train_head=train_head, train_final_norm=train_final_norm,
                     release_state=release_state, layers=layers)
        self._given = {k: v for k, v in given.items() if v is not None}
        self.config = LisaSettings(**self._given)
        self.schedule: LisaSchedule | None = None
        self.history: list[tuple[int, list[int]]] = []  # (step, layers) each time the active set was sampled
        self.active_layers: list[int] = []
        self._tuner = None

    @classmethod
    def from_config(cls, config: LisaSettings) -> LisaCallback:
        """A callback with ``config``'s settings (a :class:`LisaSettings` or a :class:`LisaConfig`)."""
        return cls(**lisa_settings(config).to_dict())

    def state(self) -> dict:
        """Saved in ``trainer_state.json`` (``stateful_callbacks``): the settings and the layers active now."""
        return {"args": self.config.to_dict(), "attributes": {"active_layers": list(self.active_layers)}}

    def _peft_tuner(self, model):
        """The LISA tuner of a LISA PEFT model (None for a plain model), its settings checked against ours."""
        tuner = lisa_tuner(model)
        if tuner is None:
            return None
        settings = lisa_settings(tuner.lisa_config)
        clash = {k: (v, getattr(settings, k)) for k, v in self._given.items() if getattr(settings, k) != v}
        if clash:
            raise ValueError("LisaCallback arguments contradict the model's LisaConfig (" + ", ".join(
                f"{k}: {a!r} here, {b!r} in the model" for k, (a, b) in clash.items()) + "); pass LisaCallback() "
                "without arguments to use the model's settings")
        self.config = settings
        return tuner

    def on_init_end(self, args, state, control, model=None, **kwargs):
        tuner = self._peft_tuner(model)
        if tuner is not None:  # the Trainer builds its optimizer from the parameters that require grad
            tuner.require_schedule().enable_all()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _refuse_sharded(args)
        _check_ddp(args)
        if model is None or optimizer is None:
            raise ValueError("LisaCallback needs the Trainer's model and optimizer at on_train_begin")
        seed = self.config.seed if self.config.seed is not None else args.seed
        self._tuner = self._peft_tuner(model)
        if self._tuner is not None:
            self.schedule = self._tuner.start_training(seed, device=args.device)
        else:
            self.schedule = LisaSchedule(model, LisaSettings(**{**self.config.to_dict(), "seed": seed}), device=args.device)
        checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers 5 name
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if not self.config.train_embeddings and checkpointing and hasattr(model, "enable_input_require_grads") \
                and not hasattr(model, "_require_grads_hook"):
            # reentrant checkpoints drop gradients of blocks whose inputs do not require grad
            model.enable_input_require_grads()
        self._apply(state.global_step, optimizer)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._apply(state.global_step, optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        if self.schedule is not None and self._tuner is None:  # a PEFT model keeps its current layers trainable
            self.schedule.restore()

    def _apply(self, step: int, optimizer) -> None:
        changed = (self._tuner.apply(step, optimizer) if self._tuner is not None
                   else self.schedule.apply(step, optimizer))
        if changed:
            self.active_layers = list(self.schedule.active_layers)
            self.history.append((step, self.active_layers))
