"""Exponential moving average of a module's weights (the sampling weights of the diffusion model)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class EMA:
    """``ema = decay * ema + (1 - decay) * weight`` after every optimiser step; buffers are copied.

    The averages live in fp32 whatever the module's dtype, so long runs with decay near 1 do not stall
    in bf16 rounding. Keys are the module's ``state_dict`` keys (saved as ``ema.safetensors``).
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
            for k, v in module.state_dict().items()
        }

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for k, v in module.state_dict().items():
            s = self.shadow[k]
            if v.is_floating_point():
                s.lerp_(v.detach().float(), 1.0 - self.decay)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise KeyError(f"EMA keys differ from the model's: {sorted(missing)[:5]}")
        for k, v in state.items():
            self.shadow[k].copy_(v)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into ``module`` (for sampling or evaluation)."""
        sd = module.state_dict()
        for k, v in self.shadow.items():
            sd[k].copy_(v.to(sd[k].dtype))
