"""Per-class LLM token representations → intervened, projected prompt tokens (batched over images).

Class ``c`` has ``L_c`` cached token representations ``H_c ∈ R^{L_c×D}``, stored zero-padded as one
tensor ``(n_cls, L_max, D)``. CILMP edits the first ``p`` and the last ``s`` tokens of every class with
two separate interventions (conditioned on the image feature ``f``) and leaves the middle unchanged;
every token is then projected ``D → r → width`` (no bias):

    T_{b,c,j} = P Φ_pre(H_{c,j} | f_b)          j < p
              = P Φ_suf(H_{c,j} | f_b)          L_c − s ≤ j < L_c
              = P H_{c,j}                       otherwise (and 0 on padding)

Because ``P`` is linear the unchanged tokens are projected once, not once per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .interventions import ConditionalIntervention, LoReFT, LowRankProjection

__all__ = ["ClassTokenIntervention", "check_lengths", "check_representations_loaded"]


def check_lengths(lengths: Sequence[int], prefix_length: int, suffix_length: int) -> list[int]:
    """Validate per-class token counts against the edited prefix/suffix; returns them as ints."""
    lengths = list(lengths)
    if not lengths:
        raise ValueError("lengths must list the token count of at least one class")
    for i, n in enumerate(lengths):
        if isinstance(n, bool) or not isinstance(n, int) or n < prefix_length + suffix_length or n <= 0:
            raise ValueError(
                f"lengths[{i}] = {n!r}: every class needs at least prefix_length + suffix_length = "
                f"{prefix_length + suffix_length} (and at least 1) tokens"
            )
    return lengths


def check_representations_loaded(module: nn.Module) -> None:
    """Raise once if ``module.class_representations`` was never filled (all zeros); then remember it was."""
    if module.__dict__.get("_representations_checked"):
        return
    if not bool(torch.any(module.class_representations != 0)):
        raise ValueError("class_representations are all zero: the config's representation_path was missing when "
                         "the adapter was injected; inject with an existing file or load_adapter a saved adapter")
    module.__dict__["_representations_checked"] = True


class ClassTokenIntervention(nn.Module):
    """Intervene on the first ``p`` / last ``s`` tokens of each class representation and project them.

    Args:
        dim: LLM representation width D.
        rank: rank r of the interventions and of the projection.
        width: output width (VLM text width, or SAM's prompt width).
        lengths: token count ``L_c`` of each class.
        prefix_length: p, tokens edited at the start of each class representation.
        suffix_length: s, tokens edited at the end.
        cond_dim: width of the image condition ``f``; None uses unconditional LoReFT interventions.
        orthogonal: keep R orthonormal during training.
        dropout: dropout after each intervention.
    """

    def __init__(self, dim: int, rank: int, width: int, lengths: Sequence[int], prefix_length: int = 4,
                 suffix_length: int = 4, cond_dim: int | None = None, orthogonal: bool = True,
                 dropout: float = 0.1) -> None:
        super().__init__()
        lengths = check_lengths(lengths, prefix_length, suffix_length)
        self.dim, self.width, self.conditional = dim, width, cond_dim is not None
        self.prefix_length, self.suffix_length = prefix_length, suffix_length

        def make() -> nn.Module:
            if cond_dim is None:
                return LoReFT(dim, rank, orthogonal=orthogonal, dropout=dropout)
            return ConditionalIntervention(dim, rank, cond_dim, orthogonal=orthogonal, dropout=dropout)

        self.prefix = make() if prefix_length else None
        self.suffix = make() if suffix_length else None
        self.projection = LowRankProjection(dim, rank, width)
        length = torch.tensor(lengths)
        edit = torch.cat([torch.arange(prefix_length).expand(len(lengths), -1),
                          length[:, None] - suffix_length + torch.arange(suffix_length)], dim=1)
        self.register_buffer("lengths", length, persistent=False)
        self.register_buffer("edit_positions", edit, persistent=False)  # (n_cls, p + s)

    @property
    def valid_mask(self) -> torch.Tensor:
        """``(n_cls, L_max)``: True on real tokens, False on padding."""
        return torch.arange(int(self.lengths.max()), device=self.lengths.device) < self.lengths[:, None]

    def _edit(self, module: nn.Module, h: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        return module(h) if condition is None else module(h, condition)

    def forward(self, representations: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``(n_cls, L_max, D)`` and ``f`` ``(B, c)`` → tokens ``(B, n_cls, L_max, width)``.

        Without a condition (unconditional interventions) the leading dimension is 1.
        """
        n_cls, l_max = self.lengths.shape[0], int(self.lengths.max())
        if representations.dim() != 3 or representations.shape[0] != n_cls or representations.shape[-1] != self.dim:
            raise ValueError(f"representations must have shape ({n_cls}, L_max, {self.dim}), "
                             f"got {tuple(representations.shape)}")
        if representations.shape[1] != l_max:
            raise ValueError(f"representations must be padded to L_max = {l_max} tokens, "
                             f"got {representations.shape[1]}")
        if self.conditional and condition is None:
            raise ValueError("condition (image features f, shape (B, c)) is required by conditional interventions")
        cond = condition if self.conditional else None
        edited = []
        if self.prefix is not None:
            edited.append(self._edit(self.prefix, representations[:, : self.prefix_length], cond))
        if self.suffix is not None:
            index = self.edit_positions[:, self.prefix_length :, None].expand(-1, -1, self.dim)
            edited.append(self._edit(self.suffix, representations.gather(1, index), cond))
        base = self.projection(representations)  # (n_cls, L_max, width): unchanged tokens, projected once
        if not edited:
            return base.unsqueeze(0)
        tokens = self.projection(torch.cat(edited, dim=-2))  # (B or n_cls-batch, n_cls, p + s, width)
        if tokens.dim() == 3:  # unconditional: no image batch
            tokens = tokens.unsqueeze(0)
        batch = tokens.shape[0]
        index = self.edit_positions[None, :, :, None].expand(batch, -1, -1, self.width)
        return base.unsqueeze(0).expand(batch, -1, -1, -1).scatter(2, index, tokens.to(base.dtype))
