"""A Trainer callback that removes norms on the schedule (freezing each at its tracked σ_avg)."""

from __future__ import annotations

from transformers import TrainerCallback

from hf_compress.methods.ln_free.schedule import LNRemovalSchedule
from hf_compress.methods.ln_free.swap import architecture, fake_status, make_removable, position0_active, remove


class LNRemovalCallback(TrainerCallback):
    """Removes norms at the start of their scheduled optimizer step.

    Swap the model's norms first (:func:`make_removable`; done here at train start if it was not). ``removed`` logs
    ``(global step, name)`` as they happen; the removals replay at train start, so resuming a run is consistent.

    Args:
        schedule: the :class:`LNRemovalSchedule`.
    """

    def __init__(self, schedule: LNRemovalSchedule):
        if not isinstance(schedule, LNRemovalSchedule):
            raise TypeError(f"schedule must be an LNRemovalSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.removed: list[tuple[int, str]] = []

    def _apply(self, model, step: int) -> None:
        status = fake_status(model)
        for at, name in self.schedule.events(_num_layers(model)):
            done = not position0_active(model) if name == "pos0" else status[name]
            if at <= step and not done:
                remove(model, name)
                self.removed.append((step, name))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        architecture(model)
        make_removable(model)
        last = self.schedule.last_step(_num_layers(model))
        if args.max_steps > 0 and last >= args.max_steps:
            raise ValueError(f"the schedule removes its last norm at step {last}, "
                             f"but training stops at {args.max_steps}")
        self._apply(model, state.global_step - 1)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply(model, state.global_step)


def _num_layers(model) -> int:
    return len(model.transformer.h) if architecture(model) == "gpt2" else len(model.model.layers)
