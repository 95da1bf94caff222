"""SD-Trans: a depth branch beside every block's space attention, for volumes run as batches of slices.

A volume ``(B, C, D, H, W)`` enters the encoder as ``B·D`` images. In each targeted block the attention
input ``LN1(x)`` is also rearranged so that the D tokens at one spatial position form a sequence,
attended with the block's own frozen attention weights, passed through a zero-initialised depth
adapter and added to the space branch before the residual:

    h = x + SpaceBranch(LN1 x) + rearrange_back(DepthAdapter(Attn_depth(rearrange(LN1 x) + P_depth)))

In SAM's windowed blocks the attention sees window-partitioned tokens, batch index
``(b·D + d)·n_windows + w``; the rearrange takes that factorisation into account, so the depth axis is
always the slice axis at one position (the public Med-SA code mixes windows of one slice there).
D = 1 skips the depth branch. ``P_depth`` is an optional zero-initialised learned depth embedding,
without which the depth branch cannot tell slice order.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator

import torch
from einops import rearrange
from torch import nn

from ..core.base import AdapterModule, AdapterWrapper, place_like
from ..core.config import MedSAConfig
from ..core.hosts import HostIntegration, host_blocks
from ..core.targets import set_submodule
from .bottleneck import BottleneckAdapter

__all__ = ["SpaceDepthAttention", "VolumeInput", "apply_space_depth", "innermost", "volume_slices"]


def innermost(module: nn.Module) -> nn.Module:
    """The host module under any stack of adapter wrappers."""
    while isinstance(module, AdapterWrapper):
        module = module.base_layer
    return module


class SpaceDepthAttention(AdapterWrapper):
    """Wraps a block's attention: ``space(x) + depth(x)`` where ``space`` is the wrapped module.

    The number of slices reaches it from :class:`VolumeInput` for the duration of one encoder call.
    """

    def __init__(self, base_layer: nn.Module, host: HostIntegration, dim: int, mlp_ratio: float = 0.25,
                 activation: str = "gelu", max_depth: int = 0) -> None:
        super().__init__(base_layer)
        self.layout = host.token_layout
        self._attend = host.depth_attention
        self.depth_adapter = place_like(BottleneckAdapter(dim, mlp_ratio, activation, skip=False), base_layer)
        self.max_depth = int(max_depth)
        weight = self.depth_adapter.down.weight
        self.depth_pos_embed = (nn.Parameter(torch.zeros(max_depth, dim, device=weight.device, dtype=weight.dtype))
                                if max_depth > 0 else None)
        self._slices: tuple[int, int] | None = None  # (D, number of images B·D) during a volume call

    def depth_attention(self, seq: torch.Tensor) -> torch.Tensor:
        """Attention over ``seq (N, D, C)`` with the host's own (frozen) attention weights.

        Without a host ``depth_attention`` the host module's ``forward`` runs a second time. It is called
        directly, not through ``__call__``, so hooks on that module see only the space attention they were
        put there for, and the plain attributes that forward rewrites (MONAI's ``SABlock.att_mat`` with
        ``save_attn=True``) are put back: they keep describing the space attention.
        """
        attn = innermost(self.base_layer)
        if self._attend is not None:
            return self._attend(attn, seq)
        state = dict(vars(attn))
        try:
            return attn.forward(seq)
        finally:
            for key in set(vars(attn)) - set(state):
                del vars(attn)[key]
            vars(attn).update(state)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self._slices is None or not self.adapters_enabled:
            return out
        depth, images = self._slices
        if depth == 1:
            return out
        if x.shape[0] % images:
            raise ValueError(f"attention input batch {x.shape[0]} is not a multiple of the {images} slice images")
        if self.layout == "bhwc":  # (B·D·nW, h, w, C): windows (or one whole image) per slice
            nw, h, w = x.shape[0] // images, x.shape[1], x.shape[2]
            seq = rearrange(x, "(b d nw) h w c -> (b nw h w) d c", d=depth, nw=nw)
        else:  # (B·D, N, C)
            seq = rearrange(x, "(b d) n c -> (b n) d c", d=depth)
        if self.depth_pos_embed is not None:
            if depth > self.max_depth:
                raise ValueError(f"volume has {depth} slices but depth_pos_embed holds {self.max_depth}")
            seq = seq + self.depth_pos_embed[:depth].to(seq.dtype)
        branch = self.depth_adapter(self.depth_attention(seq))
        if self.layout == "bhwc":
            branch = rearrange(branch, "(b nw h w) d c -> (b d nw) h w c", nw=nw, h=h, w=w)
        else:
            branch = rearrange(branch, "(b n) d c -> (b d) n c", n=x.shape[1])
        return out + branch


@contextlib.contextmanager
def volume_slices(module: nn.Module, depth: int, images: int) -> Iterator[None]:
    """Inside the block, every depth branch in ``module`` treats its input as ``images = B·D`` slice images
    of volumes with ``depth`` slices (what :class:`VolumeInput` does for one encoder call)."""
    if depth < 1 or images % depth:
        raise ValueError(f"images ({images}) must be a positive multiple of depth ({depth})")
    found = [m for m in module.modules() if isinstance(m, SpaceDepthAttention)]
    for m in found:
        m._slices = (depth, images)
    try:
        yield
    finally:
        for m in found:
            m._slices = None


def _image_ndim(encoder: nn.Module) -> int:
    """4 for encoders of 2D images, 5 for 3D (read from the first convolution, the patch embedding)."""
    for m in encoder.modules():
        if isinstance(m, nn.Conv3d):
            return 5
        if isinstance(m, nn.Conv2d):
            return 4
    return 4


class VolumeInput(AdapterModule):
    """Lets an image encoder take a volume ``(B, C, D, H, W)``: it runs as ``B·D`` slice images and its
    outputs come back as ``(B, D, ...)``. Images ``(B, C, H, W)`` behave exactly as before.

    Implemented with forward hooks on the encoder (also when the encoder is the root model); they
    are dropped by ``remove_adapters``. The depth branches are looked up in the encoder at every call,
    so copies made after injection (a ``modules_to_save`` block's trained copy) get the slice count too.
    The slice count is set by every encoder call (None for images) and is not cleared afterwards:
    gradient checkpointing recomputes blocks during backward, after the encoder call has returned, and
    the recomputation must take the depth branch as the forward did. So run one volume batch's backward
    before the next checkpointed forward with a different slice count.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.image_ndim = _image_ndim(encoder)
        self._input_name = _first_parameter(encoder)  # the volume may come by keyword: encoder(x=volume)
        self._batch: int | None = None
        self._handles = [encoder.register_forward_pre_hook(self._before, with_kwargs=True),
                         encoder.register_forward_hook(self._after)]

    @staticmethod
    def _set(encoder: nn.Module, slices: tuple[int, int] | None) -> None:
        for m in encoder.modules():
            if isinstance(m, SpaceDepthAttention):
                m._slices = slices

    def _before(self, module, args, kwargs):
        by_name = not args and self._input_name in kwargs
        x = args[0] if args else kwargs.get(self._input_name) if by_name else None
        if not isinstance(x, torch.Tensor) or x.dim() != self.image_ndim + 1:
            self._batch = None
            self._set(module, None)
            return None
        b, c, d = x.shape[:3]
        flat = x.transpose(1, 2).reshape(b * d, c, *x.shape[3:])
        self._batch = b
        self._set(module, (d, b * d))
        if by_name:
            return args, {**kwargs, self._input_name: flat}
        return (flat, *args[1:]), kwargs

    def _after(self, module, args, output):
        batch, self._batch = self._batch, None
        if batch is None:
            return None
        return _unflatten(output, batch)

    def on_remove(self) -> None:
        for h in self._handles:
            h.remove()


def _first_parameter(encoder: nn.Module) -> str | None:
    """Name of the first parameter of ``encoder.forward`` (the image), None when it takes only ``*args``."""
    try:
        parameters = list(inspect.signature(encoder.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return parameters[0].name if parameters and parameters[0].kind in kinds else None


def _unflatten(output, batch: int):
    if isinstance(output, torch.Tensor):
        return output.reshape(batch, output.shape[0] // batch, *output.shape[1:])
    if isinstance(output, (list, tuple)):
        return type(output)(_unflatten(o, batch) for o in output)
    return output


def _encoder_of(model: nn.Module, block_name: str) -> tuple[str, nn.Module]:
    """The module holding the block list: ``image_encoder`` for ``image_encoder.blocks.3``."""
    parts = block_name.split(".")
    owner = ".".join(parts[:-2]) if len(parts) >= 2 and parts[-1].isdigit() else ".".join(parts[:-1])
    return owner, (model.get_submodule(owner) if owner else model)


def apply_space_depth(model: nn.Module, block_names: list[str], config: MedSAConfig) -> list[str]:
    """Add the depth branch to the attention of each named block, and volume input to their encoder(s)."""
    hosts = {name: (block, host) for name, block, host in host_blocks(model)}
    encoders: dict[str, nn.Module] = {}
    names = []
    for name in block_names:
        block, host = hosts[name]
        wrapper = SpaceDepthAttention(getattr(block, host.attn), host, host.dim(block), config.mlp_ratio,
                                      config.activation, config.depth_pos_embed)
        set_submodule(block, host.attn, wrapper)
        names.append(f"{name}.{host.attn}")
        enc_name, encoder = _encoder_of(model, name)
        encoders.setdefault(enc_name, encoder)
    for enc_name, encoder in encoders.items():
        volume_input = VolumeInput(encoder)
        if enc_name and volume_input.image_ndim == 5:
            _warn_unreachable(model, enc_name)
        encoder.add_module("volume_input", volume_input)
        names.append(f"{enc_name}.volume_input" if enc_name else "volume_input")
    return names


def _warn_unreachable(model: nn.Module, enc_name: str) -> None:
    """A 3D-native encoder inside a larger model (MONAI's ``UNETR.vit``) takes the depth branch only for a
    stack of volumes ``(B, C, S, D, H, W)``, which the enclosing model's forward normally never passes (UNETR
    passes its ``(B, C, D, H, W)`` input, embedded as one volume): its depth adapters would train nothing.
    A warning, not an error: a model whose forward does pass such stacks to the encoder is legitimate.
    A 2D encoder inside a larger model is fine: it gets volumes from that model's forward or from direct
    calls (``sam.image_encoder(volume)``, as ``medadapt.train.prompted`` does)."""
    warnings.warn(
        f"space_depth=True: {type(model).__name__}.{enc_name} embeds 3D volumes natively, so its SD-Trans depth "
        f"branch runs only when {enc_name} itself receives a stack of volumes (B, C, S, D, H, W), which "
        f"{type(model).__name__}.forward likely never passes (UNETR's does not): the depth adapters would stay "
        f"unused. Inject into {enc_name} itself and call it with such stacks, or set space_depth=False.",
        UserWarning, stacklevel=5)
