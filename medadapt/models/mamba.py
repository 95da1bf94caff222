"""The Mamba-1 block (Gu & Dao), optionally bidirectional, over ``medadapt.kernels.selective_scan``.

Per direction, with ``x, z = in_proj(h)`` split into two ``d_inner`` halves:
``x ← silu(causal_depthwise_conv1d(x))``, ``(δ_low, B, C) = x_proj(x)``, ``δ = dt_proj.weight · δ_low``,
``y = selective_scan(x, δ, A = −exp(A_log), B, C, D, z, delta_bias = dt_proj.bias, softplus)``,
``out = out_proj(y)``. The bidirectional form (Vision-Mamba style) runs a second conv/x-proj/δ-proj/A/D
on the time-reversed sequence and averages the two ``y`` before the shared ``out_proj``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medadapt.kernels import selective_scan

__all__ = ["Mamba", "init_dt_projection"]


def init_dt_projection(
    dt_proj: nn.Linear,
    dt_rank: int,
    dt_min: float = 1e-3,
    dt_max: float = 1e-1,
    dt_init: str = "random",
    dt_scale: float = 1.0,
    dt_init_floor: float = 1e-4,
) -> None:
    """Mamba's δ-projection init, in place.

    Weight: uniform in ``±dt_scale / sqrt(dt_rank)`` (``"random"``) or that constant (``"constant"``).
    Bias: ``inverse_softplus(dt)`` with ``dt`` log-uniform in ``[dt_min, dt_max]`` (clamped at
    ``dt_init_floor``), so ``softplus(bias) = dt`` at init; ``inverse_softplus(y) = y + log(−expm1(−y))``.
    """
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"dt_min/dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    std = dt_rank**-0.5 * dt_scale
    with torch.no_grad():
        if dt_init == "constant":
            dt_proj.weight.fill_(std)
        elif dt_init == "random":
            dt_proj.weight.uniform_(-std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        log_min, log_max = math.log(dt_min), math.log(dt_max)
        dt = torch.exp(torch.rand(dt_proj.out_features) * (log_max - log_min) + log_min)
        dt = dt.clamp(min=dt_init_floor)
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]


def _make_scan_params(d_inner: int, d_state: int, d_conv: int, dt_rank: int, conv_bias: bool, dt_kwargs):
    """One scan direction's parameters: causal depthwise conv, x-proj, δ-proj, A_log, D."""
    conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=conv_bias)
    x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
    dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
    init_dt_projection(dt_proj, dt_rank, **dt_kwargs)
    # S4D-real init: A = −(1, 2, …, N) for every channel, stored as log
    a_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)))
    d_skip = nn.Parameter(torch.ones(d_inner))
    a_log._no_weight_decay = True  # type: ignore[attr-defined]
    d_skip._no_weight_decay = True  # type: ignore[attr-defined]
    return conv1d, x_proj, dt_proj, a_log, d_skip


class Mamba(nn.Module):
    """Mamba-1 mixer: ``(B, L, d_model) → (B, L, d_model)``.

    Args:
        d_model: token width.
        d_state: SSM state size N per channel.
        d_conv: width of the causal depthwise convolution.
        expand: ``d_inner = expand · d_model``.
        dt_rank: rank of the δ projection; ``"auto"`` = ``ceil(d_model / 16)``.
        dt_min, dt_max, dt_init, dt_scale, dt_init_floor: δ-projection init (see ``init_dt_projection``).
        conv_bias: bias in the depthwise conv.
        bias: bias in ``in_proj`` / ``out_proj``.
        bidirectional: add a second scan over the reversed sequence (outputs averaged).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        bidirectional: bool = False,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        if not isinstance(dt_rank, int) or dt_rank < 1:
            raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner, self.dt_rank, self.bidirectional = expand * d_model, dt_rank, bidirectional
        dt_kwargs = dict(dt_min=dt_min, dt_max=dt_max, dt_init=dt_init, dt_scale=dt_scale,
                         dt_init_floor=dt_init_floor)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        # names follow mamba_ssm (forward) and Vision Mamba (``_b``: backward) so their weights map 1:1
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = _make_scan_params(
            self.d_inner, d_state, d_conv, dt_rank, conv_bias, dt_kwargs)
        if bidirectional:
            self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b = _make_scan_params(
                self.d_inner, d_state, d_conv, dt_rank, conv_bias, dt_kwargs)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _scan(self, x, z, conv1d, x_proj, dt_proj, a_log, d_skip) -> torch.Tensor:
        """One direction: x, z ``(B, d_inner, L)`` → ``y`` ``(B, d_inner, L)``, gated by ``silu(z)``."""
        length = x.shape[-1]
        x = F.silu(conv1d(x)[..., :length])  # padding d_conv − 1 then crop the tail: causal
        x_dbl = x_proj(x.transpose(1, 2))  # (B, L, R + 2N)
        dt_low, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt_low @ dt_proj.weight.t()).transpose(1, 2).contiguous()  # bias enters as delta_bias
        fp = torch.float64 if x.dtype == torch.float64 else torch.float32  # A, D, δ-bias: fp32 at least
        return selective_scan(
            x,
            delta,
            -torch.exp(a_log.to(fp)),
            b.transpose(1, 2).contiguous(),
            c.transpose(1, 2).contiguous(),
            d_skip.to(fp),
            z=z.contiguous(),
            delta_bias=dt_proj.bias.to(fp),
            delta_softplus=True,
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``(B, L, d_model)`` → ``(B, L, d_model)``."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model:
            raise ValueError(f"hidden must be (batch, length, {self.d_model}), got {tuple(hidden.shape)}")
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (B, d_inner, L) each
        y = self._scan(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        if self.bidirectional:
            y_rev = self._scan(x.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b,
                               self.A_b_log, self.D_b)
            y = 0.5 * (y + y_rev.flip(-1))
        return self.out_proj(y.transpose(1, 2))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"expand={self.expand}, dt_rank={self.dt_rank}, bidirectional={self.bidirectional}")
