"""Small shared layers: RMSNorm, the SwiGLU MLP (FEED_FORWARDS["mlp"]) and the ReLU² MLP ("relu2")."""
from __future__ import annotations

import math

import torch
from torch import nn

from velocis.kernels.gemm import Linear
from velocis.kernels.rms_norm import rms_norm
from velocis.kernels.swiglu import swiglu
from velocis.models.registry import register_feed_forward


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 like Llama (so bf16 models match HF)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            y = rms_norm(x, self.weight, self.eps)  # same math, fewer passes (kernels/rms_norm.py)
        else:
            dtype = x.dtype
            x = x.float()
            y = self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        device = y.device.type
        if torch.is_autocast_enabled(device):
            # the next op is a matmul that casts anyway: cast once here, not once per projection
            # (q/k/v, gate/up each cast the same input) and once per projection again in backward
            y = y.to(torch.get_autocast_dtype(device))
        return y


@register_feed_forward("mlp")
class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Names match HF LlamaMLP."""

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        h, i = config.hidden_dim, config.mlp_dim
        self.gate_proj = Linear(h, i, bias=False)
        self.up_proj = Linear(h, i, bias=False)
        self.down_proj = Linear(i, h, bias=False)
        self.init_std, self.num_layers = config.init_std, config.num_layers
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_proj.weight, std=self.init_std)
        nn.init.normal_(self.up_proj.weight, std=self.init_std)
        # residual-branch output: scaled so the residual stream's variance does not grow with depth
        nn.init.normal_(self.down_proj.weight, std=self.init_std / math.sqrt(2 * self.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


@register_feed_forward("relu2")
class ReLU2MLP(nn.Module):
    """down(relu(up(x))^2): two matrices instead of SwiGLU's three (Primer, So et al. 2021; the
    modded-nanogpt speedruns), so mlp_dim 1.5x SwiGLU's holds the same parameters."""

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        h, i = config.hidden_dim, config.mlp_dim
        self.up_proj = Linear(h, i, bias=False)
        self.down_proj = Linear(i, h, bias=False)
        self.init_std, self.num_layers = config.init_std, config.num_layers
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.up_proj.weight, std=self.init_std)
        nn.init.normal_(self.down_proj.weight, std=self.init_std / math.sqrt(2 * self.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)).square())
