"""Prompt learners for open_clip ``CLIP`` models: CoOp, CoCoOp and CILMP (deep prompts + LLM class tokens).

Text prompt of class c (token ids, ``≤ context_length``; CoOp/CoCoOp have ``L_c = 0``)::

    [SOS] [X × n_ctx] [H × L_c] [class-name tokens] [.] [EOT] [pad ...]

At layer 0 the ``X`` embeddings are replaced by the learned context ``ctx_0`` (CoCoOp: ``ctx_0 + π(f_b)``,
``π`` a Linear-ReLU-Linear meta-net) and the ``H`` embeddings by the CILMP class tokens ``T^0_{b,c}``
(intervened LLM representations, conditioned on the image feature ``f_b``). With deep prompts the same
slots are overwritten again before text layers ``1 … depth−1`` by ``ctx_i`` and ``T^i``, and the image
encoder gets ``n_ctx_vision`` learned tokens appended, replaced before each of its layers ``1 … depth−1``
and dropped before pooling. Text features are pooled at EOT, so the host's text tower must use open_clip's
CLIP BPE vocabulary and EOT pooling (``text_pool_type`` ``"argmax"``, or ``"eos"`` with the EOT id); logits are
``logit_scale · cos(f_b, t_{b,c})`` with ``f_b`` the L2-normalised (prompted) image feature.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._optional import require
from ..core.base import AdapterModule, AdapterWrapper
from .class_tokens import ClassTokenIntervention, check_representations_loaded
from .config import CILMPConfig

__all__ = ["CLIPPromptLearner", "DeepVisualPrompts", "prompt_token_ids", "ZERO_SHOT_TEMPLATE"]

ZERO_SHOT_TEMPLATE = "a photo of a {}."


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return require("open_clip.tokenizer", "CLIP prompt learners").SimpleTokenizer()


def prompt_token_ids(class_names: Sequence[str], n_ctx: int, lengths: Sequence[int],
                     context_length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(n_cls, context_length)`` of ``[SOS][X×n_ctx][H×L_c][name][.][EOT]`` and each EOT index.

    Raises:
        ValueError: a prompt does not fit in ``context_length`` (naming the class).
    """
    tok = _tokenizer()
    x_id, h_id, dot = tok.encode("X")[0], tok.encode("H")[0], tok.encode(".")
    rows, eots = [], []
    for name, n_class_tokens in zip(class_names, lengths):
        ids = ([tok.sot_token_id] + [x_id] * n_ctx + [h_id] * n_class_tokens
               + tok.encode(name.replace("_", " ")) + dot + [tok.eot_token_id])
        if len(ids) > context_length:
            raise ValueError(f"the prompt of class {name!r} has {len(ids)} tokens (n_ctx={n_ctx}, {n_class_tokens} "
                             f"class tokens), longer than the context_length {context_length}")
        eots.append(len(ids) - 1)
        rows.append(ids + [0] * (context_length - len(ids)))
    return torch.tensor(rows), torch.tensor(eots)


def _check_transformer(transformer: nn.Module, what: str) -> None:
    if not hasattr(transformer, "resblocks") or not getattr(transformer, "batch_first", True):
        raise ValueError(f"{what} must be an open_clip Transformer with batch_first=True")


class DeepVisualPrompts(AdapterWrapper):
    """Wraps an open_clip vision ``Transformer``: learned tokens appended, replaced per layer, then dropped.

    ``x ← [x ; P_0]``; before block ``i ∈ 1 … depth−1`` the last ``n`` tokens become ``P_i``; the output
    drops them, so pooling and ``output_tokens`` see the host's own tokens only.
    """

    def __init__(self, base_layer: nn.Module, n_tokens: int, depth: int, width: int) -> None:
        super().__init__(base_layer)
        _check_transformer(base_layer, "visual.transformer")
        self.prompts = nn.Parameter(torch.randn(depth, n_tokens, width) * 0.02)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # host code reads transformer attributes (e.g. grad_checkpointing, width)
            return getattr(self._modules["base_layer"], name)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.adapters_enabled:
            return self.base_layer(x, attn_mask=attn_mask)
        depth, n, _ = self.prompts.shape
        prompts = self.prompts.to(x.dtype)
        x = torch.cat([x, prompts[0].expand(x.shape[0], -1, -1)], dim=1)
        for i, block in enumerate(self.base_layer.resblocks):
            if 0 < i < depth:
                x = torch.cat([x[:, :-n], prompts[i].expand(x.shape[0], -1, -1)], dim=1)
            x = block(x, attn_mask=attn_mask)
        return x[:, :-n]


class CLIPPromptLearner(AdapterModule):
    """Class logits of an open_clip ``CLIP`` through learned prompts (attached as ``model.prompt_learner``).

    ``learner(images) → (B, n_cls)`` logits. With adapters disabled it returns the host's zero-shot
    logits for the prompts ``"a photo of a {class}."``. The host is referenced, not registered, so its
    weights are not part of this module.

    Args:
        host: the open_clip ``CLIP`` model.
        config: the CILMP config (variant, context sizes, depth, intervention settings).
    """

    def __init__(self, host: nn.Module, config: CILMPConfig) -> None:
        super().__init__()
        _check_transformer(host.transformer, "the CLIP text transformer")
        self.__dict__["_host"] = host  # not a submodule: the host's weights stay the host's
        self.variant, self.n_cls = config.variant, len(config.class_names)
        self.class_names = list(config.class_names)
        width = host.token_embedding.embedding_dim
        tok = _tokenizer()
        if host.token_embedding.num_embeddings != tok.vocab_size:
            raise ValueError(f"the CLIP text tower must use open_clip's CLIP BPE vocabulary: "
                             f"token_embedding.num_embeddings is {host.token_embedding.num_embeddings}, "
                             f"expected {tok.vocab_size}")
        pool = getattr(host, "text_pool_type", "argmax")
        eos = getattr(host, "text_eos_id", None)
        if not (pool == "argmax" or (pool == "eos" and eos == tok.eot_token_id)):
            raise ValueError(f"the CLIP text tower must pool at the EOT token: text_pool_type must be 'argmax' (or "
                             f"'eos' with text_eos_id {tok.eot_token_id}), got {pool!r} (text_eos_id {eos!r})")
        embed_dim = int(host.visual.output_dim)
        layers = len(host.transformer.resblocks)
        depth = config.prompt_depth or (layers if config.variant == "cilmp" else 1)
        if depth > layers:
            raise ValueError(f"prompt_depth must be <= the {layers} text encoder layers, got {depth}")
        self.depth, self.n_ctx = depth, config.n_ctx
        self.ctx = nn.Parameter(torch.randn(depth, config.n_ctx, width) * 0.02)
        self.meta_net = None
        if config.variant == "cocoop":
            hidden = max(1, embed_dim // 16)
            self.meta_net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, width))
        lengths = [0] * self.n_cls
        self.class_tokens = None
        if config.variant == "cilmp":
            lengths = [config.representation_lengths[c] for c in config.class_names]
            self.register_buffer("class_representations",
                                 torch.zeros(self.n_cls, max(lengths), config.representation_dim))
            self.class_tokens = nn.ModuleList(
                ClassTokenIntervention(config.representation_dim, config.rank, width, lengths, config.prefix_length,
                                       config.suffix_length, cond_dim=embed_dim if config.conditional else None,
                                       orthogonal=config.orthogonal, dropout=config.dropout)
                for _ in range(depth))
        ids, eot = prompt_token_ids(config.class_names, config.n_ctx, lengths, int(host.positional_embedding.shape[0]))
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("eot_index", eot, persistent=False)
        self.conditional = config.variant == "cocoop" or (config.variant == "cilmp" and config.conditional)

    @property
    def host(self) -> nn.Module:
        return self.__dict__["_host"]

    def _insert(self, x: torch.Tensor, layer: int, f: torch.Tensor | None) -> torch.Tensor:
        """Write ``ctx_layer`` (and the class tokens of ``layer``) into their slots of ``x`` ``(M, T, W)``."""
        n, (_, length, width) = self.n_cls, x.shape
        x4 = x.view(-1, n, length, width)
        ctx = self.ctx[layer].to(x.dtype).unsqueeze(0)  # (1, n_ctx, W)
        if self.meta_net is not None and layer == 0:
            ctx = ctx + self.meta_net(f).to(x.dtype).unsqueeze(1)  # (B, n_ctx, W)
        tokens = None
        if self.class_tokens is not None:
            check_representations_loaded(self)
            reps = self.class_representations.to(x.dtype)
            tokens = self.class_tokens[layer](reps, f if self.conditional else None).to(x.dtype)
        batch = max(x4.shape[0], ctx.shape[0], 1 if tokens is None else tokens.shape[0])
        x4 = x4.expand(batch, -1, -1, -1)
        start = 1 + self.n_ctx
        pieces = [x4[:, :, :1], ctx.unsqueeze(1).expand(batch, n, -1, -1)]
        if tokens is not None:
            old = x4[:, :, start : start + tokens.shape[2]]
            mask = self.class_tokens[layer].valid_mask[None, :, :, None]
            pieces.append(torch.where(mask, tokens.expand(batch, -1, -1, -1), old))
            start += tokens.shape[2]
        pieces.append(x4[:, :, start:])
        return torch.cat(pieces, dim=2).reshape(batch * n, length, width)

    def build_prompts(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Layer-0 prompt embeddings (before the positional embedding): ``(B·n_cls or n_cls, T, W)``."""
        if self.conditional and image_features is None:
            raise ValueError("image_features are required by conditional prompts (cocoop / conditional cilmp)")
        return self._insert(self.host.token_embedding(self.token_ids), 0, image_features)

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Text features ``(B, n_cls, E)`` (conditional) or ``(1, n_cls, E)``, unnormalised."""
        host = self.host
        x = self.build_prompts(image_features)
        x = x + host.positional_embedding.to(x.dtype)
        for i, block in enumerate(host.transformer.resblocks):
            if 0 < i < self.depth:
                x = self._insert(x, i, image_features)
            x = block(x, attn_mask=host.attn_mask)
        x = host.ln_final(x)
        rows = x.shape[0] // self.n_cls
        pooled = x[torch.arange(x.shape[0], device=x.device), self.eot_index.repeat(rows)]
        proj = host.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Module) else pooled @ proj
        return pooled.view(rows, self.n_cls, -1)

    def _logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        host = self.host
        text = F.normalize(text_features, dim=-1).expand(image_features.shape[0], -1, -1)
        logits = host.logit_scale.exp() * torch.einsum("be,bne->bn", image_features, text)
        bias = getattr(host, "logit_bias", None)
        return logits + bias if bias is not None else logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        host = self.host
        image_features = F.normalize(host.encode_image(images), dim=-1)
        if not self.adapters_enabled:
            tok = _tokenizer()
            ids = torch.zeros(self.n_cls, host.positional_embedding.shape[0], dtype=torch.long)
            for row, name in enumerate(self.class_names):
                seq = tok.encode(ZERO_SHOT_TEMPLATE.format(name.replace("_", " ")))[: ids.shape[1] - 2]
                ids[row, : len(seq) + 2] = torch.tensor([tok.sot_token_id, *seq, tok.eot_token_id])
            return self._logits(image_features, host.encode_text(ids.to(images.device)).unsqueeze(0))
        return self._logits(image_features, self.text_features(image_features if self.conditional else None))
