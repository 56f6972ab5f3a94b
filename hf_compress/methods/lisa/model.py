"""LISA as a PEFT method: the tuner that ``get_peft_model(model, LisaConfig(...))`` builds.

LISA adds no modules: it trains the base model's own embeddings, head, final norm and sampled decoder layers in
place. The tuner owns a :class:`~hf_compress.methods.lisa.callback.LisaSchedule`; interval 0 is applied when the PEFT
model is made, so its trainable parameters are E + H (+ final norm) + the γ sampled layers. ``LisaCallback()``
drives the schedule under ``Trainer`` (transformers has no way for a model to hand the Trainer a callback, hence
that one line); a custom loop calls ``model.step(optimizer)`` after every optimizer step.

What the adapter holds: only what training changed — every parameter of each decoder layer sampled at least once
(in this run, or held by an adapter loaded for further training) and the embeddings / head / final norm whose switch
is on — as **full tensors, not deltas**. Chosen by size it is a tie (a dense delta is exactly as large as the
tensor), and full tensors win otherwise: a delta needs a copy of the base weights kept during training to compute,
and base + delta rounds differently from the trained tensor, whereas a full tensor loads bit for bit. A full tensor
is only right on top of the very base it was trained from, so the config records the base's fingerprint
(``calibration.resume.model_fingerprint``: the shapes of every tensor, the bytes of three) at ``get_peft_model`` and
loading onto another base — another checkpoint, architecture or dtype — is a ValueError.

Merging is free (the trained weights are already in place): ``merge_and_unload()`` returns the plain model.
``unload()`` and ``disable_adapter()`` would need the base weights back, which LISA does not keep: refused.
"""

from __future__ import annotations

import warnings

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
import torch
from torch import nn

from hf_compress.calibration.resume import model_fingerprint
from hf_compress.methods.lisa.callback import LisaSchedule, _find_layers, lisa_tuner
from hf_compress.methods.lisa.config import LisaConfig, LisaPeftType

__all__ = ["LisaModel", "lisa_tuner", "register"]

PREFIX = "base_model.model."  # PeftModel's prefix of the base model's own keys


class LisaModel(BaseTuner):
    """The LISA tuner (``peft_model.base_model``); its public methods are reachable on the ``PeftModel`` itself.

    Lifecycle: made by ``get_peft_model`` (fingerprint recorded, interval 0 applied) or by
    ``PeftModel.from_pretrained`` (fingerprint checked; frozen unless ``is_trainable=True``); driven by
    :class:`~hf_compress.methods.lisa.callback.LisaCallback` or :meth:`step`; saved with only the changed tensors.
    """

    prefix = "lisa_"  # no parameter carries it: LISA trains the base model's own
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: dict = {}

    UNSCHEDULED_FORWARDS_WARNING = 256  # training forwards without a resampling before the warning (see forward)

    def __init__(self, model, peft_config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        self.schedule: LisaSchedule | None = None
        self._sampled: set[int] = set()  # layers active in a training forward of this run
        self._loaded: set[str] = set()  # parameter names held by a loaded adapter
        self._steps = 0
        self._checked = False
        self._unscheduled_forwards = 0  # training forwards since the schedule last ran (see ``forward``)
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # -- PEFT's tuner interface: nothing is wrapped or replaced --------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        config = self.peft_config[adapter_name]
        if len(self.peft_config) > 1:
            raise ValueError("a model holds one LISA adapter: LISA trains the base weights in place, so a second "
                             "adapter would overwrite the first")
        _check_base(model, config)
        self._initial = {p: p.requires_grad for p in model.parameters()}
        self.layers_path, _ = _find_layers(model, config.layers)
        if config.inference_mode:
            for p in model.parameters():
                p.requires_grad_(False)
            return
        self.schedule = LisaSchedule(model, config)
        self.apply(0)

    def _create_and_replace(self, *args, **kwargs):
        raise NotImplementedError("LISA wraps no modules")

    @staticmethod
    def _check_target_module_exists(peft_config, key):
        return False

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """The schedule decides what trains."""

    def disable_adapter_layers(self) -> None:
        raise TypeError("a LISA adapter cannot be disabled: it trained the base weights in place and the original "
                        "ones are not kept; load the base model again for its outputs")

    def enable_adapter_layers(self) -> None:
        """Always enabled."""

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names=None):
        if not merge:
            raise TypeError("unload() would return the base model, but LISA trained its weights in place and does not "
                            "keep the originals; use merge_and_unload() for the fine-tuned plain model, or load the "
                            "base model again")
        for p, flag in self._initial.items():
            p.requires_grad_(flag)
        return super()._unload_and_optionally_merge(merge=True, progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)

    # -- the schedule ---------------------------------------------------------------------------------------------
    @property
    def lisa_config(self) -> LisaConfig:
        name = self.active_adapter if isinstance(self.active_adapter, str) else self.active_adapter[0]
        return self.peft_config[name]

    def require_schedule(self) -> LisaSchedule:
        if self.schedule is None:
            raise ValueError("this LISA adapter was loaded for inference; load it with "
                             "PeftModel.from_pretrained(base, path, is_trainable=True) to train it")
        return self.schedule

    def start_training(self, seed: int, device=None) -> LisaSchedule:
        """Sample with ``seed`` from the next :meth:`apply` on (the callback's start: the Trainer's seed, rank 0's
        under DDP)."""
        schedule = self.require_schedule()
        schedule.reseed(seed, device)
        return schedule

    def apply(self, step: int, optimizer=None) -> bool:
        """Activate the layers of optimizer step ``step`` (see ``LisaSchedule.apply``); True when resampled."""
        self._unscheduled_forwards = 0
        return self.require_schedule().apply(step, optimizer)

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled() and self.schedule is not None:
            # a layer counts as trained once a training forward ran with it active (a layer sampled after the last
            # optimizer step, or under a seed the Trainer then replaced, never trained and is not saved)
            self._sampled.update(self.schedule.active_layers)
            self._warn_if_never_resampled()
        return self.model(*args, **kwargs)

    def _warn_if_never_resampled(self) -> None:
        """Training without the callback (or ``step()``) would silently train the first layers for the whole run;
        after far more forwards than any gradient accumulation between two optimizer steps, say so once."""
        self._unscheduled_forwards += 1
        if self._unscheduled_forwards == max(4 * self.lisa_config.interval_steps, self.UNSCHEDULED_FORWARDS_WARNING):
            warnings.warn(f"LISA: {self._unscheduled_forwards} training forward passes without resampling the layers "
                          f"(still {self.active_layers}): pass `callbacks=[LisaCallback()]` to Trainer, or call "
                          "`model.step(optimizer)` after every optimizer step in a custom loop", stacklevel=3)

    def step(self, optimizer=None) -> bool:
        """For a custom loop: call after every ``optimizer.step()``. Counts the step and, at an interval boundary,
        samples the next layers (releasing the optimizer state of the leaving ones). The first call with an
        ``optimizer`` checks that it holds every parameter LISA may select (build it over ``model.parameters()``).
        Returns True when the layers were resampled."""
        schedule = self.require_schedule()
        if optimizer is not None and not self._checked:
            schedule.check_optimizer(optimizer)
            self._checked = True
        self._steps += 1
        return self.apply(self._steps, optimizer)

    @property
    def active_layers(self) -> list[int]:
        return list(self.schedule.active_layers) if self.schedule is not None else []

    @property
    def trained_layers(self) -> list[int]:
        """Decoder layers the adapter stores: trained in this run or held by a loaded adapter."""
        return sorted(self._sampled | {i for i in map(self._layer_index, self._loaded) if i is not None})

    def _layer_index(self, name: str) -> int | None:
        head = self.layers_path + "."
        return int(name[len(head):].split(".", 1)[0]) if name.startswith(head) else None

    def stored_names(self) -> list[str]:
        """Names (in the base model) of the parameters a save writes."""
        names = {id(p): n for n, p in self.model.named_parameters()}  # a tied head is saved once
        stored = set(self._loaded)
        if self.schedule is not None:
            groups = self.schedule.groups
            stored |= {names[id(p)] for p in groups.always}
            stored |= {names[id(p)] for i in self._sampled for p in groups.layers[i]}
        return sorted(stored)

    # -- save / load: full tensors of the changed parameters, keyed as in the PeftModel's state dict -----------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        tuner = _require_tuner(model)
        config.stored_layers = tuner.trained_layers
        params = dict(tuner.model.named_parameters())
        return {PREFIX + n: state_dict.get(PREFIX + n, params[n]) for n in tuner.stored_names()}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key  # the base model's own keys carry no adapter name

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        tuner = _require_tuner(model)
        known = {n for n, _ in tuner.model.named_parameters(remove_duplicate=False)}
        names = {k: k.removeprefix(PREFIX) for k in state_dict}
        unknown = sorted(k for k, n in names.items() if n not in known)
        if unknown:
            raise ValueError(f"the LISA adapter holds {len(unknown)} tensors that this base model lacks (e.g. "
                             f"{unknown[:3]}): it was trained on another base")
        tuner._loaded |= set(names.values())
        return {PREFIX + n: v for n, v in zip(names.values(), state_dict.values())}


def _check_base(model: nn.Module, config: LisaConfig) -> None:
    """Record the base's fingerprint in a new config; refuse a base other than the recorded one."""
    fingerprint = model_fingerprint(model)
    if config.base_fingerprint is None:
        config.base_fingerprint = fingerprint
        return
    if config.base_fingerprint == fingerprint:
        return
    shapes = config.base_fingerprint.split("-")[0] == fingerprint.split("-")[0]
    dtype = next((p.dtype for p in model.parameters()), None)
    raise ValueError(
        f"this LISA adapter was trained on another base model (fingerprint {config.base_fingerprint}, this "
        f"{type(model).__name__} has {fingerprint}): "
        + ("same tensor shapes but different weights — another checkpoint, or the same one in another dtype "
           f"(this one is {dtype}); load the base it was trained on, in its dtype" if shapes else
           "the tensor names or shapes differ — another architecture or size")
        + (f"; it records base_model_name_or_path={config.base_model_name_or_path!r}" if config.base_model_name_or_path
           else ""))


def _require_tuner(model) -> LisaModel:
    tuner = lisa_tuner(model)
    if tuner is None:
        raise TypeError(f"a LISA adapter is saved and loaded through its PeftModel, got {type(model).__name__}")
    return tuner


def register() -> None:
    """Write the method into PEFT's type mappings (idempotent)."""
    key = LisaPeftType.LISA
    PEFT_TYPE_TO_CONFIG_MAPPING[key] = LisaConfig
    PEFT_TYPE_TO_TUNER_MAPPING[key] = LisaModel
    PEFT_TYPE_TO_PREFIX_MAPPING[key] = LisaModel.prefix


register()
