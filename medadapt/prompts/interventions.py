"""Low-rank representation interventions: LoReFT, DiReFT and CILMP's image-conditioned form.

All act on the last dimension of a representation ``h ∈ R^D`` through a rank-``r`` subspace spanned by
the rows of ``R ∈ R^{r×D}``:

* LoReFT (pyreft):  ``Φ(h) = h + Rᵀ(W h + b − R h)``
* DiReFT:           ``Φ(h) = h + Rᵀ(W h + b)``
* conditional (CILMP): ``s = W_s [h ; φ(f) ⊙ h] + b_s``, ``φ(f) = U2(U1 f + c1) + c2``,
  ``Φ(h | f) = h + Rᵀ(s − R h)``

With ``orthogonal=True`` R is kept orthonormal (``R Rᵀ = I``) throughout training by
``torch.nn.utils.parametrizations.orthogonal`` (as pyreft does); with ``orthogonal=False`` R is only
initialised orthonormal and then trained freely (as the public CILMP code does).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations

__all__ = ["ConditionalIntervention", "DiReFT", "LoReFT", "LowRankProjection", "LowRankRotation"]


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_dropout(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {value!r}")
    return float(value)


class LowRankRotation(nn.Module):
    """The subspace ``R ∈ R^{r×D}`` (rows span the edited subspace); ``weight`` is R.

    Args:
        dim: representation width D.
        rank: subspace rank r (``r ≤ D``).
        orthogonal: keep the rows orthonormal under training (parametrisation) or only initialise so.
    """

    def __init__(self, dim: int, rank: int, orthogonal: bool = True) -> None:
        super().__init__()
        _check_positive("dim", dim)
        _check_positive("rank", rank)
        if rank > dim:
            raise ValueError(f"rank must be <= dim, got rank={rank} > dim={dim}")
        self.dim, self.rank, self.orthogonal = dim, rank, bool(orthogonal)
        self.proj = nn.Linear(dim, rank, bias=False)
        nn.init.orthogonal_(self.proj.weight)
        if self.orthogonal:
            # Householder map without trivialisation: the default trivialisation keeps a D×D orthogonal
            # base buffer (64 MB and an 8 s QR at D = 4096), this keeps only the r×D reflectors
            parametrizations.orthogonal(self.proj, "weight", orthogonal_map="householder", use_trivialization=False)
            maps = self.proj.parametrizations.weight
            maps[0] = _HalfPrecisionSafe(maps[0])  # a model cast to bf16/fp16 after injection keeps working

    @property
    def weight(self) -> torch.Tensor:
        """R, shape ``(rank, dim)``."""
        return self.proj.weight


_HALF = (torch.float16, torch.bfloat16)


class _HalfPrecisionSafe(nn.Module):
    """A parametrization run in float32 for float16/bfloat16 tensors, its result cast back: torch has no
    half-precision ``householder_product``, so R of a model cast to bf16 after injection is formed in fp32.
    Holds no tensors, so the state-dict keys of the orthogonal parametrization are unchanged."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.inner(X.float()).to(X.dtype) if X.dtype in _HALF else self.inner(X)

    def right_inverse(self, Q: torch.Tensor) -> torch.Tensor:
        return self.inner.right_inverse(Q.float()).to(Q.dtype) if Q.dtype in _HALF else self.inner.right_inverse(Q)


class LoReFT(nn.Module):
    """LoReFT: ``Φ(h) = h + Rᵀ(W h + b − R h)`` on the last dimension, then dropout.

    Facts: ``W = R, b = 0`` gives the identity; with orthonormal R, ``R Φ(h) = W h + b`` and the edit
    ``Φ(h) − h`` lies in R's row space. Parameters: ``2·D·r + r``.

    Args:
        dim: representation width D.
        rank: subspace rank r.
        orthogonal: keep R orthonormal during training (pyreft) or only initialise it so (CILMP code).
        dropout: dropout on the output (0 disables).
    """

    def __init__(self, dim: int, rank: int, orthogonal: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.rotation = LowRankRotation(dim, rank, orthogonal)
        self.source = nn.Linear(dim, rank)  # W, b
        self.dropout = nn.Dropout(_check_dropout(dropout))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype
        r = self.rotation.weight
        h = h.to(r.dtype)
        out = h + (self.source(h) - h @ r.T) @ r
        return self.dropout(out).to(dtype)


class DiReFT(nn.Module):
    """DiReFT: ``Φ(h) = h + Rᵀ(W h + b)`` (no ``−R h`` term; R need not be orthonormal).

    Args:
        dim: representation width D.
        rank: subspace rank r.
        orthogonal: keep R orthonormal during training (default: only initialised orthonormal).
        dropout: dropout on the output.
    """

    def __init__(self, dim: int, rank: int, orthogonal: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.rotation = LowRankRotation(dim, rank, orthogonal)
        self.source = nn.Linear(dim, rank)
        self.dropout = nn.Dropout(_check_dropout(dropout))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype
        r = self.rotation.weight
        h = h.to(r.dtype)
        return self.dropout(h + self.source(h) @ r).to(dtype)


class ConditionalIntervention(nn.Module):
    """CILMP's image-conditioned LoReFT, batched over images.

    ``φ(f) = U2(U1 f + c1) + c2`` (c → r → D, no nonlinearity),
    ``s = W_s [h ; φ(f) ⊙ h] + b_s`` (``W_s ∈ R^{r×2D}``), ``Φ(h | f) = h + Rᵀ(s − R h)``, then dropout.

    With ``φ ≡ 0`` it is LoReFT with ``W = W_s[:, :D]``, ``b = b_s``. Parameters:
    ``4·D·r + c·r + 2r + D`` (139,280 for D = 4096, r = 8, c = 512).

    Args:
        dim: representation width D.
        rank: subspace rank r.
        cond_dim: condition width c (e.g. the VLM image-embedding width).
        orthogonal: keep R orthonormal during training (default) or only initialise it so.
        dropout: dropout on the output (CILMP uses 0.1).
    """

    def __init__(self, dim: int, rank: int, cond_dim: int, orthogonal: bool = True, dropout: float = 0.1) -> None:
        super().__init__()
        _check_positive("cond_dim", cond_dim)
        self.dim, self.rank, self.cond_dim = dim, rank, cond_dim
        self.rotation = LowRankRotation(dim, rank, orthogonal)
        self.source = nn.Linear(2 * dim, rank)  # W_s, b_s
        self.condition = nn.Sequential(nn.Linear(cond_dim, rank), nn.Linear(rank, dim))  # U1, c1, U2, c2
        self.dropout = nn.Dropout(_check_dropout(dropout))

    def forward(self, h: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Intervene on ``h`` (``(*S, D)``, e.g. ``(n_cls, L, D)``) for every condition ``f`` (``(B, c)``).

        Returns:
            ``(B, *S, D)``: the representation edited for each image, without a loop over images.
        """
        if h.shape[-1] != self.dim:
            raise ValueError(f"h must have last dimension {self.dim}, got shape {tuple(h.shape)}")
        if condition.dim() != 2 or condition.shape[-1] != self.cond_dim:
            raise ValueError(f"condition must have shape (B, {self.cond_dim}), got {tuple(condition.shape)}")
        dtype = h.dtype
        r = self.rotation.weight
        h = h.to(r.dtype)
        phi = self.condition(condition.to(r.dtype))  # (B, D)
        phi = phi.view(phi.shape[0], *([1] * (h.dim() - 1)), self.dim)
        w_plain, w_cond = self.source.weight[:, : self.dim], self.source.weight[:, self.dim :]
        # W_s [h ; φ⊙h] + b_s, split so the image-independent half is computed once
        s = nn.functional.linear(h, w_plain, self.source.bias) + nn.functional.linear(phi * h, w_cond)
        out = h + (s - h @ r.T) @ r
        return self.dropout(out).to(dtype)


class LowRankProjection(nn.Module):
    """``x ↦ B (A x)``: width ``in_dim → rank → out_dim``, no bias (maps LLM tokens to a prompt width)."""

    def __init__(self, in_dim: int, rank: int, out_dim: int) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("rank", rank), ("out_dim", out_dim)):
            _check_positive(name, value)
        self.down = nn.Linear(in_dim, rank, bias=False)
        self.up = nn.Linear(rank, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        return self.up(self.down(x.to(self.down.weight.dtype))).to(dtype)
