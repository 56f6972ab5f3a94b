"""Teacher Intervention (Kim et al., EACL'23, arXiv 2302.11812): the schedule and the student–teacher wrapper.

Step 1 (``intervention_steps`` optimizer steps) replaces signals inside the student's attention blocks by the
full-precision teacher's, so the quantization error of one layer does not propagate through the rest while the
student learns; TI-G, the paper's recommended schedule, moves the intervention point from the attention output
(TI-O, first sixth) to the attention context (TI-C, second sixth) to the attention map (TI-M, the rest). Step 2 is
plain KD-QAT. Points:

* ``output``  — the attention block's output projection returns the teacher's output (before residual and norm);
* ``context`` — the output projection receives the teacher's attention context (probabilities · values);
* ``map``     — the attention probabilities multiplying the values are the teacher's (the student's own map still
  feeds the attention-map loss, which is then the only path by which Q and K learn, as in the paper).

The student's own attention outputs and maps are what the losses see in every phase. The wrapper is an ``nn.Module``
whose ``forward`` returns the distillation loss, so ``transformers.Trainer`` trains it as is; the teacher is held
outside its module tree (not trained, not saved in checkpoints, not moved by the Trainer).
"""

from __future__ import annotations

import re
import sys
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from hf_compress.methods.ti_qat.losses import DistillationLoss, attention_mse, hidden_mse, soft_cross_entropy

POINTS = ("output", "context", "map")
ATTENTION_NAME = "hfc_ti"  # the attention implementation the student runs under (eager math, map replaceable)
# the linear that turns the attention context into the block's output, across the common architectures
DEFAULT_OUTPUT_MODULE = r"(self_attn\.o_proj|attention\.output\.dense|attn\.c_proj|self_attention\.dense|attn\.out_proj)$"
# wrappers whose hooks are installed. The current batch's run stays on its wrapper until the next batch (not just for
# the forward call): gradient checkpointing recomputes the student's blocks during backward, and the recomputation
# must substitute the same teacher signals or the gradients belong to a different forward.
_INSTALLED: "weakref.WeakSet[TeacherIntervention]" = weakref.WeakSet()


@dataclass
class TIConfig:
    """The Teacher Intervention schedule.

    Args:
        intervention_steps: optimizer steps of step 1 (the paper: 60; 120 for its smallest models); 0 is plain
            KD-QAT.
        schedule: intervention points of step 1 and their shares, ``point:share`` comma-separated, in order
            (points: output, context, map). The default is TI-G (1/6 output, 1/6 context, 4/6 map); ``map:1`` is
            TI-M alone.
        output_module: regex (``re.search`` on module names) of the attention output projections; empty: the
            usual names (``self_attn.o_proj``, BERT's ``attention.output.dense``, ...).
    """

    intervention_steps: int = 60
    schedule: str = "output:1,context:1,map:4"
    output_module: str = ""

    def __post_init__(self):
        if isinstance(self.intervention_steps, bool) or not isinstance(self.intervention_steps, int) or self.intervention_steps < 0:
            raise ValueError(f"intervention_steps must be a non-negative integer, got {self.intervention_steps!r}")
        self.phases()  # validates the schedule
        try:
            re.compile(self.output_module or DEFAULT_OUTPUT_MODULE)
        except re.error as exc:
            raise ValueError(f"output_module {self.output_module!r} is not a valid regex: {exc}") from None

    def phases(self) -> list[tuple[str, float]]:
        out = []
        for part in [p.strip() for p in str(self.schedule).split(",") if p.strip()]:
            point, _, share = part.partition(":")
            if point.strip() not in POINTS:
                raise ValueError(f"schedule {self.schedule!r}: unknown intervention point {point.strip()!r}; choose from {POINTS}")
            try:
                value = float(share) if share else 1.0
            except ValueError:
                raise ValueError(f"schedule {self.schedule!r}: share {share!r} of {point!r} is not a number") from None
            if not value > 0:
                raise ValueError(f"schedule {self.schedule!r}: share of {point!r} must be > 0")
            out.append((point.strip(), value))
        if not out:
            raise ValueError("schedule names no intervention point (e.g. 'output:1,context:1,map:4')")
        return out


class TISchedule:
    """Which point intervenes at each optimizer step: a pure function of the step, so a resumed run continues the
    same schedule with no saved state."""

    def __init__(self, config: TIConfig):
        self.config = config
        phases, total, cum = config.phases(), 0.0, 0.0
        total = sum(share for _, share in phases)
        self.boundaries = []  # (first step after the phase, point)
        for point, share in phases:
            cum += share
            self.boundaries.append((round(config.intervention_steps * cum / total), point))

    def point_at(self, step: int) -> str | None:
        for end, point in self.boundaries:
            if step < end:
                return point
        return None

    def describe(self) -> list[dict]:
        """``[{"point", "start", "end"}]`` of the non-empty phases (for the model card)."""
        out, start = [], 0
        for end, point in self.boundaries:
            if end > start:
                out.append({"point": point, "start": start, "end": end})
            start = max(start, end)
        return out


# -- the attention implementation ---------------------------------------------------------------------------------


def _eager_of(module):
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"{type(module).__name__}'s modelling file has no eager_attention_forward; Teacher "
                         "Intervention on attention maps needs a transformers model with eager attention")
    return fn


def ti_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """The model's own eager attention; in the student of an installed :class:`TeacherIntervention` it may substitute
    the teacher's map (see ``_Run.attention``); everywhere else (the teacher too) it is plain eager attention."""
    out, probs = _eager_of(module)(module, query, key, value, attention_mask, *args, **kwargs)
    for wrapper in list(_INSTALLED):
        if wrapper._run is not None and id(module) in wrapper._student_ids:
            return wrapper._run.attention(module, value, out, probs)
    return out, probs


def register_attention() -> None:
    """Register ``hfc_ti`` with transformers' attention and mask interfaces (eager masks); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, ti_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


def _set_attention(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


class _Run:
    """The teacher's signals of one batch and the point the student's forward substitutes."""

    def __init__(self, point, teacher_maps, teacher_io, index):
        self.point, self.teacher_maps, self.teacher_io, self.index = point, teacher_maps, teacher_io, index
        self.own_outputs: dict[str, torch.Tensor] = {}

    def attention(self, module, value, out, probs):
        if self.point != "map":
            return out, probs
        i = self.index.setdefault(id(module), len(self.index))
        teacher = self.teacher_maps[i].to(value.dtype)
        value = value.repeat_interleave(teacher.shape[1] // value.shape[1], dim=1)  # grouped-query heads
        return torch.matmul(teacher, value).transpose(1, 2).contiguous(), probs


class TeacherIntervention(nn.Module):
    """Student + full-precision teacher; ``forward`` returns the KD-QAT loss (and the student's logits).

    Args:
        student: the model being trained (fake-quantized with ``prepare_qat``).
        teacher: the full-precision model (bf16 saves memory); set to eval, no gradients, kept out of the module tree.
        config: :class:`TIConfig` (intervention points and schedule).
        loss: :class:`DistillationLoss` (term weights).

    ``point`` (``None``, ``"output"``, ``"context"`` or ``"map"``) is set by :class:`TeacherInterventionCallback`
    before every optimizer step. A batch's substitutions stay in force until the next batch (gradient checkpointing
    recomputes the student's forward during backward), so call the student on its own only after :meth:`close`
    (the callback calls it when training ends), which removes every hook and restores the student's attention
    implementation: the student is then the plain model again.
    """

    supports_gradient_checkpointing = True

    def __init__(self, student: nn.Module, teacher: nn.Module, config: TIConfig | None = None,
                 loss: DistillationLoss | None = None):
        super().__init__()
        if student is teacher:
            raise ValueError("teacher and student are the same module; load the full-precision teacher separately")
        self.student, self.ti_config, self.loss_weights = student, config or TIConfig(), loss or DistillationLoss()
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))
        self.config = student.config  # what Trainer reads (e.g. use_cache)
        pattern = re.compile(self.ti_config.output_module or DEFAULT_OUTPUT_MODULE)
        self.output_modules = [n for n, _ in student.named_modules() if pattern.search(n)]
        teacher_names = {n for n, _ in teacher.named_modules()}
        if not self.output_modules or any(n not in teacher_names for n in self.output_modules):
            raise ValueError(f"output_module {pattern.pattern!r} matches no attention output projection present in both "
                             "student and teacher; pass output_module= naming them")
        self.point: str | None = None
        self._hooks: list = []
        self._attn_before = None
        self._index: dict[int, int] = {}  # attention module -> layer, in call order (the teacher's map order)
        self._teacher_run: dict | None = None
        self._run: _Run | None = None
        self._student_ids = {id(m) for m in student.modules()}
        self.last_terms: dict[str, float] = {}

    # -- hooks ------------------------------------------------------------------------------------------------------
    def _install(self) -> None:
        if self._hooks:
            return
        register_attention()
        _INSTALLED.add(self)
        self._attn_before = self.student.config._attn_implementation
        _set_attention(self.student, ATTENTION_NAME)
        # the teacher too (plain eager math: substitutions only touch the student's modules), so a config the two
        # share stays right
        self._teacher_attn_before = self.teacher.config._attn_implementation
        _set_attention(self.teacher, ATTENTION_NAME)
        for name in self.output_modules:
            s, t = self.student.get_submodule(name), self.teacher.get_submodule(name)
            self._hooks += [t.register_forward_hook(self._teacher_hook(name)),
                            s.register_forward_pre_hook(self._context_hook(name)),
                            s.register_forward_hook(self._output_hook(name))]

    def close(self) -> None:
        """Remove the hooks and give the student back its attention implementation."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        _INSTALLED.discard(self)
        self._run = None
        if self._attn_before is not None:
            _set_attention(self.teacher, self._teacher_attn_before)
            _set_attention(self.student, self._attn_before)
            self._attn_before = None
        self.point = None

    def _teacher_hook(self, name):
        def hook(module, args, output):
            run = self._teacher_run
            if run is not None:
                run[name] = (args[0].detach(), output.detach())
        return hook

    def _context_hook(self, name):
        def hook(module, args):
            run = self._run
            if run is not None and run.point == "context":
                return (run.teacher_io[name][0].to(args[0].dtype),) + tuple(args[1:])
        return hook

    def _output_hook(self, name):
        def hook(module, args, output):
            run = self._run
            if run is None:
                return None
            run.own_outputs[name] = output
            if run.point == "output":
                return run.teacher_io[name][1].to(output.dtype)
        return hook

    # -- training step ------------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None):
        if self.point is not None and self.point not in POINTS:
            raise ValueError(f"intervention point {self.point!r}: choose from {POINTS} or None")
        self._install()
        w = self.loss_weights
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        need_maps = w.attention > 0 or self.point == "map"
        self._teacher_run = {}
        with torch.no_grad():
            t = self.teacher(**inputs, output_hidden_states=w.hidden > 0, output_attentions=need_maps)
        run = self._run = _Run(self.point, t.attentions if need_maps else None, self._teacher_run, self._index)
        self._teacher_run = None
        s = self.student(**inputs, labels=labels if w.label > 0 else None,
                         output_hidden_states=w.hidden > 0, output_attentions=w.attention > 0)
        mask = attention_mask if attention_mask is not None and s.logits.dim() == 3 else None
        terms = {"logits": soft_cross_entropy(s.logits, t.logits, mask, w.temperature) if w.logits else None,
                 "hidden": hidden_mse(s.hidden_states, t.hidden_states, attention_mask, w.relative) if w.hidden else None,
                 "attention": attention_mse(s.attentions, t.attentions, attention_mask) if w.attention else None,
                 "attention_output": hidden_mse([run.own_outputs[n] for n in run.teacher_io],
                                                [io[1] for io in run.teacher_io.values()], attention_mask,
                                                w.relative) if w.attention_output else None,
                 "label": s.loss if w.label else None}
        loss = sum(getattr(w, k) * v for k, v in terms.items() if v is not None)
        self.last_terms = {k: float(v.detach()) for k, v in terms.items() if v is not None}
        return {"loss": loss, "logits": s.logits}

    # -- what Trainer calls -------------------------------------------------------------------------------------------
    def activation_checkpointing_enable(self, **kwargs):
        fn = getattr(self.student, "activation_checkpointing_enable", None) or self.student.gradient_checkpointing_enable
        return fn(**kwargs)

    def state_dict(self, *args, **kwargs):
        """The student's tensors, each storage once (tied embeddings would make safetensors refuse the save; the
        Trainer reloads non-strictly, and the tie restores the alias)."""
        out, seen = {}, set()
        for k, v in super().state_dict(*args, **kwargs).items():
            key = (v.data_ptr(), v.shape, v.dtype) if v.numel() else (k,)
            if key not in seen:
                seen.add(key)
                out[k] = v
        return out
