"""The steered module: a wrapper that applies LinEAS's coordinate-wise affine map to its base module's output.

Math (``steer``): ``T^λ(z) = (1 + λ(ω − 1)) ⊙ z + λ b`` on the last dimension of ``z``. The parameters are kept in
float32 whatever the model's dtype (the deviations ω − 1 and b are small; bf16 would round most of them away) and
cast to ``z``'s dtype in the forward pass.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from hf_compress.methods.lineas.config import check_strength

__all__ = ["LineasLayer", "steer", "steered_dim"]


def steer(z: torch.Tensor, omega: torch.Tensor, bias: torch.Tensor, strength: float) -> torch.Tensor:
    """``T^λ(z)``; strength 0 returns ``z`` itself, so the base model is reproduced bit for bit."""
    if strength == 0:
        return z
    if strength == 1:
        return torch.addcmul(bias.to(z.dtype), omega.to(z.dtype), z)
    scale = 1 + strength * (omega - 1)
    return torch.addcmul((strength * bias).to(z.dtype), scale.to(z.dtype), z)


def steered_dim(module: nn.Module) -> int:
    """Width of ``module``'s output: a norm's weight, a Linear's out_features, or the model's hidden size."""
    for attr in ("normalized_shape", "out_features", "hidden_size", "embed_dim"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
        if isinstance(value, (tuple, list, torch.Size)) and len(value) == 1:
            return int(value[0])
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.shape[0]
    raise ValueError(f"cannot tell the output width of {type(module).__name__}: LinEAS steers modules whose output "
                     "width is known (norms, Linears, decoder blocks with hidden_size); name other target_modules")


class LineasLayer(nn.Module, BaseTunerLayer):
    """``base_layer`` followed by one affine map per adapter (ω in ``lineas_omega``, b in ``lineas_bias``).

    A module returning a tuple (some decoder blocks) has its first element steered. Only one adapter may be active
    in a forward pass: two maps applied one after the other would be a third map nobody trained.
    """

    adapter_layer_names = ("lineas_omega", "lineas_bias")
    other_param_names = ("strength",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, dim: int, strength: float, inference_mode: bool):
        super().__init__()
        self.base_layer = base_layer
        self.lineas_omega = nn.ParameterDict()
        self.lineas_bias = nn.ParameterDict()
        self.strength: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.dim = dim
        self.update_layer(adapter_name, strength, inference_mode)

    def update_layer(self, adapter_name: str, strength: float, inference_mode: bool = False) -> None:
        device = next((p.device for p in self.base_layer.parameters()), None)
        self.lineas_omega[adapter_name] = nn.Parameter(torch.ones(self.dim, device=device))
        self.lineas_bias[adapter_name] = nn.Parameter(torch.zeros(self.dim, device=device))
        self.strength[adapter_name] = check_strength(strength)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_strength(self, strength: float, adapter_name: str) -> None:
        self.strength[adapter_name] = check_strength(strength)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise TypeError("a LinEAS adapter cannot be merged into the weights: it adds a bias after modules that have "
                        "none (e.g. RMSNorm); keep the PeftModel, or set its strength")

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        if self.disable_adapters or not self.active_adapters:
            return out
        if len(self.active_adapters) > 1:
            raise ValueError(f"LinEAS applies one adapter at a time, {self.active_adapters} are active")
        name = self.active_adapters[0]
        if name not in self.lineas_omega:
            return out
        z = out[0] if isinstance(out, tuple) else out
        z = steer(z, self.lineas_omega[name], self.lineas_bias[name], self.strength[name])
        return (z, *out[1:]) if isinstance(out, tuple) else z

    def __repr__(self) -> str:
        return "lineas." + super().__repr__()
