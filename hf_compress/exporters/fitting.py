"""Fit a model's per-module plan to what a reader can hold: report, refuse, or widen exactly.

A :class:`Reader` says which schemes it serves and whether fused projections must share one. :func:`fit_modules`
walks every quantizable module and decides, per fused set, the scheme each member is written with:

* ``exact`` — the module's own scheme, accepted as it is (``unquantized``: dense in the source, written dense);
* ``widened`` — the narrowest accepted scheme it rewrites into without changing a weight (``grids.rewrite``);
* ``dense`` — fp16 weights (no accepted scheme holds it: mixed widths, short groups, a packed head or table);
* ``refused`` — what would need widening when the policy is ``"refuse"``; the exporter raises, listing them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from hf_compress.allocation.fused import fused_groups
from hf_compress.exporters.grids import Scheme, can_rewrite, join, module_scheme, packed_bytes, stored_bytes
from hf_compress.formats.embedding import PackedEmbedding
from hf_compress.formats.linear import PackedLinear

POLICIES = ("refuse", "widen")


@dataclass(frozen=True)
class Reader:
    """What one runtime reads. ``accept(scheme, (out, in)) -> reason or None``; ``widen(scheme) -> narrowest accepted``."""

    name: str
    accept: callable
    widen: callable
    fused_share_scheme: bool = False
    packed_head: bool = True


@dataclass
class ModuleFit:
    name: str
    source: str  # the module's own scheme, described
    status: str  # exact | widened | dense | refused
    scheme: Scheme | None = None  # what is written (None: dense)
    reason: str = ""
    extra_bytes: int = 0


@dataclass
class FitReport:
    reader: str
    modules: dict[str, ModuleFit] = field(default_factory=dict)

    @property
    def refused(self) -> list[ModuleFit]:
        return [m for m in self.modules.values() if m.status == "refused"]

    @property
    def extra_bytes(self) -> int:
        return sum(m.extra_bytes for m in self.modules.values())

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.modules.values():
            out[m.status] = out.get(m.status, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {"reader": self.reader, "counts": self.counts(), "extra_bytes": self.extra_bytes,
                "modules": {n: {"source": m.source, "status": m.status, "reason": m.reason, "extra_bytes": m.extra_bytes,
                                "written": "dense fp16" if m.scheme is None else m.scheme.describe()}
                            for n, m in self.modules.items()}}

    def table(self, limit: int = 40) -> str:
        return report_table(self.to_dict(), limit)


def report_table(report: dict, limit: int = 40) -> str:
    """Plain text of a :meth:`FitReport.to_dict`: the counts, then one line per module not written as planned."""
    lines = [f"{report['reader']}: " + ", ".join(f"{n} {s}" for s, n in sorted(report["counts"].items()))]
    rows = [(n, m) for n, m in report["modules"].items() if m["status"] not in ("exact", "unquantized")]
    for n, m in rows[:limit]:
        lines.append(f"  {m['status']:8s} {n}: {m['source']} -> {m['written']} ({m['reason']})")
    if len(rows) > limit:
        lines.append(f"  … {len(rows) - limit} more")
    if report["extra_bytes"]:
        lines.append(f"  widening costs {report['extra_bytes'] / 2**20:.2f} MB more than the packed checkpoint")
    return "\n".join(lines)


def _describe(module) -> str:
    if not isinstance(module, PackedLinear):
        return "dense"
    scheme, why = module_scheme(module)
    return scheme.describe(module.in_features) if scheme else f"{module.spec.bits}-bit max, {why}"


def _own(module, reader: Reader, head: bool) -> tuple[Scheme | None, str | None]:
    """The module's scheme and why the reader cannot take it as is (None: it can)."""
    if isinstance(module, PackedEmbedding):
        return None, f"{reader.name} reads no quantized embedding table"
    scheme, why = module_scheme(module)
    if scheme is None:
        return None, why
    if head and not reader.packed_head:
        return None, f"{reader.name} serves the output head only unquantized"
    return scheme, reader.accept(scheme, (module.out_features, module.in_features))


def fit_modules(model: nn.Module, names: list[str], reader: Reader, policy: str = "refuse",
                head_name: str | None = None) -> FitReport:
    """Decide how each of ``names`` is written for ``reader`` under ``policy`` (see the module docstring)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown servability policy {policy!r}; choose one of {', '.join(POLICIES)}")
    report = FitReport(reader.name)
    groups = fused_groups(names) if reader.fused_share_scheme else [[n] for n in names]
    for group in groups:
        mods = {n: model.get_submodule(n) for n in group}
        packed = {n: m for n, m in mods.items() if isinstance(m, PackedLinear)}
        if not packed:
            for n in group:
                report.modules[n] = ModuleFit(n, "dense", "unquantized", None, "dense in the source")
            continue
        own = {n: _own(m, reader, n == head_name) for n, m in packed.items()}
        schemes = [s for s, _ in own.values()]
        shared = len(set(schemes)) == 1 and len(packed) == len(group)
        if all(s is not None and why is None for s, why in own.values()) and (shared or len(group) == 1):
            for n, (s, _) in own.items():
                report.modules[n] = ModuleFit(n, _describe(mods[n]), "exact", s)
            continue
        # Something must change: say why, per member, then find the widened scheme (or dense) for the set.
        why_group = "" if shared or len(group) == 1 else (
            "fused with " + ", ".join(x.rpartition('.')[2] for x in group) + " into one matrix: one scheme for all")
        target = None
        if len(packed) == len(group) and all(s is not None for s in schemes):
            target = reader.widen(join(schemes))
            if target is not None and not all(can_rewrite(s, target) and reader.accept(
                    target, (m.out_features, m.in_features)) is None for s, m in zip(schemes, packed.values())):
                target = None
        for n in group:
            m = mods[n]
            s, why = own.get(n, (None, "unquantized"))
            reason = "; ".join(r for r in (why, why_group) if r) or "fused set widened"
            written = target if isinstance(m, PackedLinear) else None
            if written == s and s is not None:
                report.modules[n] = ModuleFit(n, _describe(m), "exact", s)
                continue
            shape = (m.out_features, m.in_features) if isinstance(m, PackedLinear) else tuple(m.weight.shape)
            new = 2 * shape[0] * shape[1] if written is None else packed_bytes(written, shape)
            old = stored_bytes(m) if isinstance(m, PackedLinear) else 2 * shape[0] * shape[1]
            status = "refused" if policy == "refuse" else ("dense" if written is None else "widened")
            report.modules[n] = ModuleFit(n, _describe(m), status, written, reason, max(new - old, 0))
    return report


def refusal_message(report: FitReport, option: str) -> str:
    bad = report.refused
    listed = "; ".join(f"{m.name}: {m.reason}" for m in bad[:8])
    return (f"{report.reader} cannot serve {len(bad)} module(s) as planned ({listed}{'; …' if len(bad) > 8 else ''}). "
            f"Re-plan with fused_groups=True and servable widths, or pass {option} to widen them exactly "
            f"(+{report.extra_bytes / 2**20:.2f} MB)")
