"""Which unrolled position runs which shared block, and which original layers initialise each block.

Kept free of torch modules so the mapping can be tested (and printed) on its own: every other part of the
recursive code — tying, initialisation, LoRA placement, early exit — reads it from here.
"""

from __future__ import annotations

SCHEMES = ("cycle", "sequence")
INITS = ("stepwise", "average", "lower")


def check_recursion(num_layers: int, num_loops: int, scheme: str) -> int:
    """Validate a recursion setting and return the number of unique blocks K = L / B."""
    if scheme not in SCHEMES:
        raise ValueError(f"recursion scheme must be one of {SCHEMES}, got {scheme!r}")
    if not isinstance(num_loops, int) or isinstance(num_loops, bool) or num_loops < 1:
        raise ValueError(f"num_loops must be a positive integer, got {num_loops!r}")
    if num_layers % num_loops:
        raise ValueError(
            f"num_loops={num_loops} does not divide the model's {num_layers} decoder layers; "
            f"choose one of {[b for b in range(1, num_layers + 1) if num_layers % b == 0]}"
        )
    return num_layers // num_loops


def unique_block(position: int, num_layers: int, num_loops: int, scheme: str) -> int:
    """The shared block applied at unrolled ``position``: CYCLE repeats the stack (0,1,2,0,1,2), SEQUENCE
    repeats each block in place (0,0,1,1,2,2)."""
    k = check_recursion(num_layers, num_loops, scheme)
    return position % k if scheme == "cycle" else position // num_loops


def position_groups(num_layers: int, num_loops: int, scheme: str) -> list[list[int]]:
    """For each shared block, the unrolled positions that run it (the first one owns the stored weights)."""
    k = check_recursion(num_layers, num_loops, scheme)
    groups: list[list[int]] = [[] for _ in range(k)]
    for position in range(num_layers):
        groups[unique_block(position, num_layers, num_loops, scheme)].append(position)
    return groups


def init_sources(num_layers: int, num_loops: int, scheme: str, init: str) -> list[list[int]]:
    """For each shared block, the original layers whose weights it starts from (averaged when several).

    Stepwise keeps every B-th layer including the first and last (``round(linspace(0, L-1, K))``; the paper's
    "fixed ends"); Average takes the mean of the layers the block replaces; Lower takes the first K layers.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    k = check_recursion(num_layers, num_loops, scheme)
    if init == "average":
        return position_groups(num_layers, num_loops, scheme)
    if init == "lower":
        return [[i] for i in range(k)]
    if k == 1:
        return [[0]]
    return [[round(i * (num_layers - 1) / (k - 1))] for i in range(k)]


def loop_boundaries(num_layers: int, num_loops: int, scheme: str) -> list[int]:
    """Unrolled positions after which one full loop has run (the early-exit points); CYCLE only."""
    k = check_recursion(num_layers, num_loops, scheme)
    if scheme != "cycle":
        raise ValueError("early exit after a loop needs scheme='cycle': with 'sequence' no prefix of the "
                         "unrolled stack is a complete pass over the shared blocks")
    return [(b + 1) * k - 1 for b in range(num_loops)]
