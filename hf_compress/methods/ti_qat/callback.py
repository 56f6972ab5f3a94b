"""``TeacherInterventionCallback``: runs the Teacher Intervention schedule inside ``transformers.Trainer``."""

from __future__ import annotations

from transformers import TrainerCallback

from hf_compress.methods.ti_qat.intervention import TeacherIntervention, TIConfig, TISchedule


class TeacherInterventionCallback(TrainerCallback):
    """Sets the intervention point of a :class:`TeacherIntervention` model before every optimizer step (step 1:
    the schedule's points; step 2: none, plain KD-QAT) and restores the plain student when training ends.

    The point is a function of ``state.global_step`` alone, so a run resumed from a Trainer checkpoint continues the
    schedule exactly where it stopped. ``history`` lists ``(step, point)`` at every switch; ``on_log`` adds the
    current point's index and the loss terms of the last batch to the Trainer's logs.

    Args:
        config: :class:`TIConfig`.
    """

    def __init__(self, config: TIConfig | None = None):
        self.config = config or TIConfig()
        self.schedule = TISchedule(self.config)
        self.history: list[tuple[int, str | None]] = []

    @staticmethod
    def _wrapper(model) -> TeacherIntervention:
        if not isinstance(model, TeacherIntervention):
            raise TypeError(f"TeacherInterventionCallback trains a TeacherIntervention model, got {type(model).__name__}")
        return model

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._wrapper(model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        model = self._wrapper(model)
        point = self.schedule.point_at(state.global_step)
        if not self.history or self.history[-1][1] != point:
            self.history.append((state.global_step, point))
        model.point = point

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        # the last batch's terms (per step when logging_steps=1); also into the entry the Trainer just appended to
        # log_history, which is what trainer_state.json keeps, so a resumed run still has the whole curve
        if logs is None or "loss" not in logs or not getattr(model, "last_terms", None):
            return
        terms = {f"kd_{k}": round(v, 6) for k, v in model.last_terms.items()}
        logs.update(terms)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(terms)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._wrapper(model).close()

    def describe(self) -> dict:
        """What the model card records: the schedule in steps and its settings."""
        return {"intervention_steps": self.config.intervention_steps, "schedule": self.config.schedule,
                "phases": self.schedule.describe(), "output_module": self.config.output_module or "auto"}
