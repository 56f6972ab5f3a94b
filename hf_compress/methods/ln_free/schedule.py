"""When each norm is removed: the paper's order, one layer at a time, on a (start, gap) schedule.

Order (Heimersheim 2024; Baroni et al. 2025): every ``ln_2`` (MLP input), then every ``ln_1`` QK path, then every
``ln_1`` V path (the most sensitive), then ``ln_f``. Each group starts ``gap`` steps after the previous group's last
removal unless given its own start; ``gap = 0`` removes a whole group at once (for runs too short for one layer per
step; ``layers_per_step = k`` removes k consecutive layers at each of a group's steps instead of one, for runs too
short for one layer per step). A norm scheduled at step ``s`` is fake for optimizer step ``s`` (0-based) and every
later one. ``gap_pos0`` (optional) adds a last event ``pos0``, that many steps after ``ln_f``: the position-0 σ
(``make_removable(model, position0=True)``) collapses to the shared σ_avg, the papers' disable_bos_std.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUPS = ("ln_2", "ln_1qk", "ln_1v")


@dataclass(frozen=True)
class LNRemovalSchedule:
    """Args:
        start: step of the first ``ln_2`` removal.
        gap_ln2, gap_ln1qk, gap_ln1v: steps between consecutive layers in each group (0: the whole group at once).
        gap_ln_f: steps from the last ``ln_1v`` removal to ``ln_f``.
        start_ln1qk, start_ln1v: explicit group starts (default: right after the previous group, one gap later).
        layers_per_step: layers removed together at each step of a group (default 1).
        gap_pos0: steps from ``ln_f`` to collapsing the position-0 σ (None: keep it; the structural export keeps it).
    """

    start: int = 50
    gap_ln2: int = 10
    gap_ln1qk: int = 15
    gap_ln1v: int = 15
    gap_ln_f: int = 15
    start_ln1qk: int | None = None
    start_ln1v: int | None = None
    layers_per_step: int = 1
    gap_pos0: int | None = None

    def __post_init__(self):
        for name in ("start", "gap_ln2", "gap_ln1qk", "gap_ln1v", "gap_ln_f", "start_ln1qk", "start_ln1v",
                     "layers_per_step", "gap_pos0"):
            value = getattr(self, name)
            if value is None and (name.startswith("start_") or name == "gap_pos0"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.layers_per_step < 1:
            raise ValueError(f"layers_per_step must be >= 1, got {self.layers_per_step}")

    def events(self, num_layers: int) -> list[tuple[int, str]]:
        """``[(step, norm name)]`` in removal order."""
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        gaps = (self.gap_ln2, self.gap_ln1qk, self.gap_ln1v)
        starts = (self.start, self.start_ln1qk, self.start_ln1v)
        events, step = [], None
        for group, gap, start in zip(GROUPS, gaps, starts):
            if start is None:
                start = step + max(gap, 1)  # a group never shares its first step with the previous group's last
            elif step is not None and start <= step:
                raise ValueError(f"{group} starts at {start}, not after the previous group's last removal ({step})")
            for i in range(num_layers):
                step = start + (i // self.layers_per_step) * gap
                events.append((step, f"{group}.{i}"))
        events.append((step + max(self.gap_ln_f, 1), "ln_f"))
        if self.gap_pos0 is not None:
            events.append((events[-1][0] + max(self.gap_pos0, 1), "pos0"))
        return events

    def fake_at(self, step: int, num_layers: int) -> set[str]:
        """Names that are fake during optimizer step ``step``."""
        return {name for s, name in self.events(num_layers) if s <= step}

    def last_step(self, num_layers: int) -> int:
        return self.events(num_layers)[-1][0]
