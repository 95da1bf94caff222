"""``MambaMIM``: masked image modeling around an existing 3D encoder, by hooks (its source untouched).

``loss = MambaMIM(encoder, config)(volume)``:

1. draw ``visible (B, g³)`` at the deepest grid (``round((1 − ratio)·L)`` cells per sample) and zero the
   masked patches of the input;
2. run the encoder with the masking hooks (``medadapt.mim.hooks``): masked patches stay exactly zero at
   every CNN scale, norms use visible statistics, the sequence (Mamba) stage sees visible tokens only;
3. fill the deepest masked tokens by TOKI, the other scales' by a learned mask token, project each scale
   to the decoder width (1×1×1 conv), decode (``LightDecoder``) to ``in_channels`` at full resolution;
4. per-patch normalised MSE over masked patches (``medadapt.mim.loss``).

``detach()`` removes every hook and returns the encoder, whose state dict is the plain encoder's.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .config import MambaMIMConfig
from .decoder import LightDecoder
from .hooks import MaskingHooks
from .loss import masked_patch_mse, normalised_patch_targets, patchify, unpatchify
from .masking import random_visible_mask, upsample_mask
from .targets import EncoderSpec, resolve_encoder_spec
from .toki import TOKI

__all__ = ["MambaMIM"]


def _first_conv_in_channels(encoder: nn.Module) -> int:
    for module in encoder.modules():
        if isinstance(module, nn.Conv3d):
            return module.in_channels
    raise ValueError("in_channels: the encoder has no Conv3d; set MambaMIMConfig(in_channels=...)")


@contextmanager
def _eval_mode(module: nn.Module):
    """Put ``module`` in eval mode inside the context; every submodule's ``training`` flag is restored after,
    even on an exception."""
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        yield module
    finally:
        for submodule, mode in modes.items():
            submodule.training = mode


class MambaMIM(nn.Module):
    """MambaMIM pretraining wrapper (see the module docstring).

    Args:
        encoder: e.g. ``medadapt.models.HybridMambaEncoder`` or MONAI ``SegResNet``; any encoder whose
            feature modules are named in ``config`` works.
        config: ``MambaMIMConfig`` (defaults: ratio 0.75, causal TOKI, norm-pix loss, detected hooks).
    """

    def __init__(self, encoder: nn.Module, config: MambaMIMConfig | None = None):
        super().__init__()
        self.config = config = config or MambaMIMConfig()
        spec = resolve_encoder_spec(encoder, config.feature_modules, config.sequence_module,
                                    config.encode_method, config.patch_size)
        self.encoder = encoder
        self.in_channels = config.in_channels or _first_conv_in_channels(encoder)
        channels, strides = self._probe(spec)
        self.patch_size = strides[-1]
        if spec.patch_size is not None and spec.patch_size != self.patch_size:
            raise ValueError(f"patch_size: the deepest feature has stride {self.patch_size}, "
                             f"not {spec.patch_size}")
        if self.patch_size < 2:
            raise ValueError(f"feature_modules: the deepest feature must be downsampled, stride {self.patch_size}")
        self.spec = EncoderSpec(spec.feature_modules, spec.sequence_module, spec.encode_method, self.patch_size)
        self.feature_channels, self.feature_strides = channels, strides
        self.toki = TOKI(channels[-1], config.toki_exponent)
        self.decoder = LightDecoder(self.patch_size, config.decoder_width or channels[-1], self.in_channels)
        # skip features: the deepest feature module of each decoder stride below the patch size
        self._skips = {s: max(i for i, t in enumerate(strides) if t == s)
                       for s in self.decoder.strides[1:] if s in strides}
        self.densify = nn.ModuleDict({
            str(s): nn.Conv3d(channels[i], self.decoder.width_at(s), 1)
            for s, i in [(self.patch_size, len(channels) - 1), *self._skips.items()]
        })
        self.mask_tokens = nn.ParameterDict({
            str(s): nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, channels[i], 1, 1, 1), std=0.02,
                                                       a=-0.02, b=0.02))
            for s, i in self._skips.items()
        })
        self._hooks: MaskingHooks | None = MaskingHooks(encoder, self.spec)

    # -- setup ---------------------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor, spec: EncoderSpec | None = None):
        method = (spec or self.spec).encode_method
        return self.encoder(x) if method is None else getattr(self.encoder, method)(x)

    @torch.no_grad()
    def _probe(self, spec: EncoderSpec) -> tuple[list[int], list[int]]:
        """Channels and strides of the feature modules, from one eval-mode run on a small zero volume."""
        size = 2 * spec.patch_size if spec.patch_size else 64
        modules = dict(self.encoder.named_modules())
        seen: dict[str, torch.Tensor] = {}
        handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o))
                   for n in spec.feature_modules]
        param = next(self.encoder.parameters(), None)
        x = torch.zeros(1, self.in_channels, size, size, size,
                        device=param.device if param is not None else None,
                        dtype=param.dtype if param is not None else None)
        try:
            with _eval_mode(self.encoder):
                self._encode(x, spec)
        finally:
            for handle in handles:
                handle.remove()
        channels, strides = [], []
        for name in spec.feature_modules:
            out = seen.get(name)
            if not torch.is_tensor(out) or out.dim() != 5:
                raise ValueError(f"feature_modules: {name!r} must output (B, C, D, H, W), got "
                                 f"{type(out).__name__ if not torch.is_tensor(out) else tuple(out.shape)}")
            channels.append(out.shape[1])
            strides.append(size // out.shape[2])
        return channels, strides

    # -- masking and forward -------------------------------------------------------------------------
    def random_mask(self, volume: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random ``visible (B, g_d, g_h, g_w)`` mask for ``volume`` at this config's ratio."""
        grid = [s // self.patch_size for s in volume.shape[2:]]
        return random_visible_mask(volume.shape[0], grid, self.config.mask_ratio, generator, volume.device)

    def _check(self, volume: torch.Tensor, visible: torch.Tensor | None, generator) -> torch.Tensor:
        if self._hooks is None:
            raise RuntimeError("MambaMIM was detached; wrap the encoder again to pretrain")
        if volume.dim() != 5 or volume.shape[1] != self.in_channels:
            raise ValueError(f"volume must be (B, {self.in_channels}, D, H, W), got {tuple(volume.shape)}")
        if any(s % self.patch_size for s in volume.shape[2:]):
            raise ValueError(f"volume's spatial sizes must be multiples of {self.patch_size}, "
                             f"got {tuple(volume.shape[2:])}")
        grid = tuple(s // self.patch_size for s in volume.shape[2:])
        if visible is None:
            return self.random_mask(volume, generator)
        if visible.shape != (volume.shape[0], *grid) or visible.dtype != torch.bool:
            raise ValueError(f"visible must be bool {(volume.shape[0], *grid)}, got {visible.dtype} "
                             f"{tuple(visible.shape)}")
        empty = (~visible.flatten(1).any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"visible: each sample needs at least one visible cell; samples {empty} have none")
        return visible.to(volume.device)

    def _reconstruct(self, volume: torch.Tensor, visible: torch.Tensor):
        """Masked encoding → TOKI/mask tokens → decoder. Returns the reconstruction ``(B, C, D, H, W)``."""
        masked_input = volume * upsample_mask(visible, volume.shape[2:]).to(volume.dtype)
        with self._hooks.masking(visible):
            self._encode(masked_input)
            features = [self._hooks.features[name] for name in self.spec.feature_modules]
        filled = self.toki.fill_grid(features[-1], visible)
        to_decoder = {self.patch_size: self.densify[str(self.patch_size)](filled)}
        for stride, index in self._skips.items():
            feature = features[index]
            keep = upsample_mask(visible, feature.shape[2:])
            feature = torch.where(keep, feature, self.mask_tokens[str(stride)].to(feature.dtype))
            to_decoder[stride] = self.densify[str(stride)](feature)
        return self.decoder(to_decoder)

    def _targets(self, volume: torch.Tensor):
        if self.config.norm_pix_loss:
            return normalised_patch_targets(volume, self.patch_size)
        patches = patchify(volume, self.patch_size)
        return patches, torch.zeros_like(patches[..., :1]), torch.ones_like(patches[..., :1])

    def forward(self, volume: torch.Tensor, visible: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction loss of ``volume (B, C, D, H, W)`` under ``visible`` (random if None)."""
        visible = self._check(volume, visible, generator)
        reconstruction = patchify(self._reconstruct(volume, visible), self.patch_size)
        target, _, _ = self._targets(volume)
        return masked_patch_mse(reconstruction, target, visible.flatten(1))

    @torch.no_grad()
    def reconstruct(self, volume: torch.Tensor, visible: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """For inspection: ``visible``, ``masked`` input, ``reconstruction`` in intensity units, ``merged``
        (input where visible, reconstruction elsewhere) and ``loss``.

        The encoder runs in eval mode (normalisations with running statistics use them and no buffer is
        updated); every submodule's ``training`` flag is restored afterwards, even on an exception."""
        visible = self._check(volume, visible, generator)
        grid = visible.shape[1:]
        with _eval_mode(self.encoder):
            predicted = patchify(self._reconstruct(volume, visible), self.patch_size)
        target, mean, std = self._targets(volume)
        keep = upsample_mask(visible, volume.shape[2:])
        image = unpatchify(predicted * std + mean, self.patch_size, grid)
        return {
            "visible": visible,
            "masked": volume * keep.to(volume.dtype),
            "reconstruction": image,
            "merged": torch.where(keep, volume, image),
            "loss": masked_patch_mse(predicted, target, visible.flatten(1)),
        }

    def detach(self) -> nn.Module:
        """Remove every hook and return the untouched encoder (for fine-tuning)."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        return self.encoder
