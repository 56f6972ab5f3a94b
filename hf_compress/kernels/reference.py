"""Pure-torch dequantization of a ``PackedLinear``: the precision contract every kernel must meet."""

from __future__ import annotations

import torch

from ..formats.grid import dequantize_weight


def dequantize_reference(module, dtype=torch.float32) -> torch.Tensor:
    return dequantize_weight(module.codes(), module.scales, module.zeros(), module.spec, dtype=dtype)
