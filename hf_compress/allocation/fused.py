"""Projections that servers fuse into one matrix, and so must share one quantization scheme.

vLLM (and TGI, SGLang) load q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj``; a layer whose fused
members disagree in width, group size or symmetry is refused. A planner that wants its mixed plan served must
therefore allocate each fused set as one item; an exporter must check (or widen) the same sets.
"""

from __future__ import annotations

from collections import defaultdict

FUSED_SETS = (
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen, Gemma, Phi-3 (unfused checkpoints)
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),  # BERT-style encoders
    ("w1", "w3"),  # Mixtral-style experts
)


def fused_groups(names) -> list[list[str]]:
    """Partition module names into fused sets (members present under one parent) and singletons, in name order."""
    names = list(names)
    member_of = {leaf: i for i, fused in enumerate(FUSED_SETS) for leaf in fused}
    buckets: dict[tuple, list[str]] = defaultdict(list)
    order = []
    for name in names:
        parent, _, leaf = name.rpartition(".")
        key = (parent, member_of[leaf]) if leaf in member_of else (name, None)
        if key not in buckets:
            order.append(key)
        buckets[key].append(name)
    return [buckets[k] for k in order]
