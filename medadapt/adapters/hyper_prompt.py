"""HyP-Adpt: adapters in SAM's mask decoder whose bottleneck weights are generated from the prompt.

Per sample ``b`` with sparse prompt tokens ``p_b ∈ R^{N×P}`` (clicks, box corners) and tokens
``x_b ∈ R^{T×C}`` (METHODS.md §1)::

    e_b   = W_e · mean_n(p_b) + c_e                       ∈ R^L    (pooled prompt, reduced)
    w_b   = reshape(M(e_b))                               ∈ R^{L×L} (M: Linear-act-Linear)
    h_b   = ReLU(LayerNorm(W_down x_b + b_down) @ w_b)    ∈ R^{T×L}
    out_b = W_up h_b + b_up                               ∈ R^{T×C} (W_up, b_up zero-initialised)

with ``L = int(mlp_ratio · C)``. The paper does not say how the ``N`` prompt tokens are reduced; the
mean is order-free and defined for any ``N`` (``N = 0`` gives ``e = c_e``). All samples run in one
``torch.bmm``. The norm (LayerNorm over ``L``) acts on ``e_down @ w`` as in the paper:
``e_down ← ReLU(Norm(e_down @ w))``.

:class:`HyPDecoderBlock` wraps a ``TwoWayAttentionBlock`` and adds, per block:

* the HyP-Adpt, sequential on the self-attention output of the query tokens:
  ``a ← a + HyP(a | prompt)``;
* a parallel MLP adapter: ``q ← q + MLP(q) + s · Adapter(q)`` (s = ``mlp_scale``);
* a sequential adapter after the image-to-token cross-attention: ``a ← a + Adapter(a)`` before
  ``keys ← keys + a``.

All up-projections start at zero, so the decoder is unchanged at init; with
``adapters_enabled = False`` the host block runs as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._optional import require
from ..core.base import AdapterModule, AdapterWrapper, place_like
from ..core.config import MedSAConfig
from ..core.targets import matches
from .bottleneck import BottleneckAdapter, hidden_width

__all__ = ["HyPDecoderBlock", "HyperPromptAdapter", "apply_hyper_prompt"]

_ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU}


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return F.linear(x, layer.weight.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))


class HyperPromptAdapter(AdapterModule):
    """Bottleneck adapter whose ``L×L`` middle weights are generated per sample from the prompt.

    Args:
        dim: token width C.
        prompt_dim: width P of the prompt tokens (SAM: the decoder width, 256).
        mlp_ratio: bottleneck width ``L = int(mlp_ratio · C)``.
        activation: hidden activation of the weight generator ``M`` (``"gelu"``, ``"gelu_tanh"``, ``"relu"``).
        zero_init: zero the up-projection so the adapter output starts at 0.

    Parameters: ``(P·L + L) + (L·L + L) + (L·L² + L²) + (C·L + L) + 2L + (L·C + C)``; 320,064 for SAM's
    decoder (C = P = 256, ratio 0.25, L = 64). A :class:`HyPDecoderBlock` adds two bottleneck adapters
    (33,088 each): 772,480 for SAM's two decoder blocks.
    """

    def __init__(self, dim: int, prompt_dim: int | None = None, mlp_ratio: float = 0.25,
                 activation: str = "gelu", zero_init: bool = True) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        prompt_dim = dim if prompt_dim is None else prompt_dim
        if prompt_dim <= 0:
            raise ValueError(f"prompt_dim must be > 0, got {prompt_dim}")
        self.dim, self.prompt_dim, self.hidden = dim, prompt_dim, hidden_width(dim, mlp_ratio)
        hidden = self.hidden
        self.prompt_proj = nn.Linear(prompt_dim, hidden)
        self.weight_generator = nn.Sequential(nn.Linear(hidden, hidden), _ACTIVATIONS[activation](),
                                              nn.Linear(hidden, hidden * hidden))
        self.down = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, dim)
        if zero_init:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def prompt_embedding(self, prompt_tokens: torch.Tensor) -> torch.Tensor:
        """``e = W_e · mean_n(p) + c_e``, shape ``(B, L)`` (``N = 0`` pools to zeros)."""
        if prompt_tokens.ndim != 3 or prompt_tokens.shape[-1] != self.prompt_dim:
            raise ValueError(f"prompt_tokens must have shape (B, N, {self.prompt_dim}), "
                             f"got {tuple(prompt_tokens.shape)}")
        pooled = prompt_tokens.sum(1) / max(prompt_tokens.shape[1], 1)
        return _linear(pooled, self.prompt_proj)

    def generate_weights(self, prompt_tokens: torch.Tensor) -> torch.Tensor:
        """Per-sample bottleneck weights ``w = reshape(M(e)) ∈ R^{B×L×L}``."""
        e = self.prompt_embedding(prompt_tokens)
        first, act, last = self.weight_generator
        w = _linear(act(_linear(e, first)), last)
        return w.view(-1, self.hidden, self.hidden)

    def forward(self, x: torch.Tensor, prompt_tokens: torch.Tensor) -> torch.Tensor:
        """Adapter output for tokens ``x`` of shape ``(B, ..., C)`` conditioned on ``(B, N, P)`` prompts."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension {self.dim}, got shape {tuple(x.shape)}")
        if x.ndim < 2 or prompt_tokens.shape[0] != x.shape[0]:
            raise ValueError(f"x (batch {x.shape[0] if x.ndim else None}) and prompt_tokens (batch "
                             f"{prompt_tokens.shape[0]}) must share the leading batch dimension")
        if not self.adapters_enabled:
            return torch.zeros_like(x)
        w = self.generate_weights(prompt_tokens.to(x.dtype))
        e_down = _linear(x, self.down).reshape(x.shape[0], -1, self.hidden)
        mixed = torch.bmm(e_down, w)
        hidden = torch.relu(F.layer_norm(mixed, (self.hidden,), self.norm.weight.to(x.dtype),
                                         self.norm.bias.to(x.dtype), self.norm.eps))
        return _linear(hidden, self.up).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, prompt_dim={self.prompt_dim}, hidden={self.hidden}"


class HyPDecoderBlock(AdapterWrapper):
    """A SAM ``TwoWayAttentionBlock`` with HyP-Adpt, an MLP adapter and an image-to-token adapter.

    Args:
        base_layer: the host ``TwoWayAttentionBlock`` (its submodules are used as they are).
        num_output_tokens: leading query tokens that are not prompts: ``1 + num_mask_tokens`` of the
            ``MaskDecoder`` (the IoU token and the mask tokens). ``query_pe[:, num_output_tokens:]``
            are the sparse prompt embeddings.
        mlp_ratio, activation: of all three adapters.
        mlp_scale: ``s`` of the parallel MLP adapter.
    """

    def __init__(self, base_layer: nn.Module, num_output_tokens: int, mlp_ratio: float = 0.25,
                 activation: str = "gelu", mlp_scale: float = 0.5) -> None:
        super().__init__(base_layer)
        if not isinstance(num_output_tokens, int) or num_output_tokens < 0:
            raise ValueError(f"num_output_tokens must be an integer >= 0, got {num_output_tokens!r}")
        dim = base_layer.norm1.normalized_shape[-1]
        self.num_output_tokens = num_output_tokens
        self.hyper_adapter = place_like(HyperPromptAdapter(dim, dim, mlp_ratio, activation), base_layer)
        self.mlp_adapter = place_like(BottleneckAdapter(dim, mlp_ratio, activation, scale=mlp_scale), base_layer)
        self.image_adapter = place_like(BottleneckAdapter(dim, mlp_ratio, activation, skip=True), base_layer)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.base_layer
        if not self.adapters_enabled:
            return block(queries=queries, keys=keys, query_pe=query_pe, key_pe=key_pe)
        prompt_tokens = query_pe[:, self.num_output_tokens:]
        # self-attention of the query tokens, then HyP-Adpt on its output
        if block.skip_first_layer_pe:
            attn_out = block.self_attn(q=queries, k=queries, v=queries)
            queries = attn_out + self.hyper_adapter(attn_out, prompt_tokens)
        else:
            q = queries + query_pe
            attn_out = block.self_attn(q=q, k=q, v=queries)
            queries = queries + (attn_out + self.hyper_adapter(attn_out, prompt_tokens))
        queries = block.norm1(queries)
        # tokens attend to the image
        q = queries + query_pe
        k = keys + key_pe
        attn_out = block.cross_attn_token_to_image(q=q, k=k, v=keys)
        queries = block.norm2(queries + attn_out)
        # MLP with the parallel adapter
        mlp_out = self.mlp_adapter(queries, residual=block.mlp(queries))
        queries = block.norm3(queries + mlp_out)
        # the image attends to the tokens, then the sequential adapter
        q = queries + query_pe
        k = keys + key_pe
        attn_out = self.image_adapter(block.cross_attn_image_to_token(q=k, k=q, v=queries))
        keys = block.norm4(keys + attn_out)
        return queries, keys

    def extra_repr(self) -> str:
        return f"num_output_tokens={self.num_output_tokens}"


def apply_hyper_prompt(model: nn.Module, config: MedSAConfig) -> list[str]:
    """Wrap every ``TwoWayAttentionBlock`` of SAM's mask decoder(s) in a :class:`HyPDecoderBlock`.

    Args:
        model: a ``Sam`` (or any module holding a ``MaskDecoder``) or a ``MaskDecoder`` itself.
        config: uses ``mlp_ratio``, ``activation`` and ``mlp_scale``; a decoder whose name matches
            ``exclude_modules`` is skipped (``target_modules`` selects encoder blocks, not decoders).

    Returns:
        Names (relative to ``model``) of the wrapped blocks. New adapters take the device of the block they
        wrap, in float32 (float64 on a float64 host).

    Raises:
        ValueError: no ``MaskDecoder`` in ``model`` (or every one excluded), or its blocks already carry HyP
            adapters.
    """
    modeling = require("segment_anything.modeling", "HyP-Adpt")
    from segment_anything.modeling.transformer import TwoWayAttentionBlock

    decoders = [(name, module) for name, module in model.named_modules()
                if isinstance(module, modeling.MaskDecoder)]
    if not decoders:
        raise ValueError(f"model must be or contain a segment_anything MaskDecoder, found none in "
                         f"{type(model).__name__}")
    if config.exclude_modules is not None:
        kept = [(name, module) for name, module in decoders if not (name and matches(name, config.exclude_modules))]
        if not kept:
            raise ValueError(f"hyper_prompt=True but exclude_modules={config.exclude_modules!r} excludes every "
                             f"mask decoder ({', '.join(name for name, _ in decoders)})")
        decoders = kept
    wrapped: list[str] = []
    for decoder_name, decoder in decoders:
        if any(isinstance(m, HyPDecoderBlock) for m in decoder.modules()):
            raise ValueError(f"mask decoder {decoder_name or type(decoder).__name__!r} already has HyP adapters")
        blocks = [(n, m) for n, m in decoder.named_modules() if isinstance(m, TwoWayAttentionBlock)]
        for block_name, block in blocks:
            wrapper = HyPDecoderBlock(block, 1 + int(decoder.num_mask_tokens), config.mlp_ratio,
                                      config.activation, config.mlp_scale)
            parent_name, _, attr = block_name.rpartition(".")
            setattr(decoder.get_submodule(parent_name) if parent_name else decoder, attr, wrapper)
            wrapped.append(".".join(p for p in (decoder_name, block_name) if p))
    return wrapped
