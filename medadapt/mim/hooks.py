"""Forward hooks that turn an unmodified encoder into a SparK/MambaMIM masked encoder.

While a mask is set (``with hooks.masking(visible): encoder(x)``):

* every ``Conv3d``/``ConvTranspose3d``/pooling output and every ``LayerNorm3d`` output outside the
  sequence module is multiplied by the mask upsampled to its resolution;
* every GroupNorm/InstanceNorm3d/BatchNorm3d output is replaced by the visible-only normalisation of
  its input (``sparse_ops.visible_norm``); BatchNorm running statistics see visible voxels only;
* the sequence module receives only the visible tokens of each sample, in raster order, and its output
  is scattered back to the full grid with zeros at masked tokens;
* the outputs of the feature modules are recorded in ``hooks.features``.

With no mask set every hook is a no-op, so the wrapped encoder behaves exactly as before; ``remove()``
detaches all hooks. Elementwise ops inside ``forward`` that map 0 to non-zero (e.g. ``x + 1``) or
channels-last ``nn.Linear`` layers are not seen by hooks: such encoders need a spec of their own.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from .masking import gather_visible_tokens, scatter_visible_tokens, upsample_mask
from .sparse_ops import MASKED_OUTPUT_TYPES, PER_VOXEL_NORM_TYPES, VISIBLE_NORM_TYPES, visible_norm
from .targets import EncoderSpec

__all__ = ["MaskingHooks"]


class MaskingHooks:
    """Installs the masking hooks on ``encoder`` as described by ``spec`` (see the module docstring)."""

    def __init__(self, encoder: nn.Module, spec: EncoderSpec):
        self.spec = spec
        self.features: dict[str, torch.Tensor] = {}
        self._visible: torch.Tensor | None = None
        self._mask_cache: dict[tuple, torch.Tensor] = {}
        self._handles: list = []
        self._token_index: torch.Tensor | None = None
        self._saved_stats: dict[int, tuple[torch.Tensor, ...]] = {}
        modules = dict(encoder.named_modules())
        skip = spec.sequence_module
        for name, module in encoder.named_modules():
            if skip is not None and (name == skip or name.startswith(skip + ".")):
                continue
            if isinstance(module, VISIBLE_NORM_TYPES):
                self._handles.append(module.register_forward_pre_hook(self._save_running_stats))
                self._handles.append(module.register_forward_hook(self._visible_norm))
            elif isinstance(module, MASKED_OUTPUT_TYPES + PER_VOXEL_NORM_TYPES):
                self._handles.append(module.register_forward_hook(self._mask_output))
        if skip is not None:
            self._handles.append(modules[skip].register_forward_pre_hook(self._keep_visible_tokens))
            self._handles.append(modules[skip].register_forward_hook(self._scatter_tokens))
        for name in spec.feature_modules:
            # a partial of a bound method (not a closure) so copy.deepcopy re-targets it to the copy
            self._handles.append(modules[name].register_forward_hook(partial(self._record, name)))

    @property
    def active(self) -> bool:
        return self._visible is not None

    @contextmanager
    def masking(self, visible: torch.Tensor):
        """Run the encoder masked by ``visible (B, g_d, g_h, g_w)`` inside this context."""
        self._visible, self._mask_cache, self.features = visible, {}, {}
        try:
            yield self
        finally:
            self._visible, self._mask_cache, self._token_index = None, {}, None
            self._saved_stats = {}

    def mask_at(self, size, dtype: torch.dtype) -> torch.Tensor:
        """The current mask at spatial ``size``, ``(B, 1, *size)`` in ``dtype`` (cached)."""
        key = (tuple(size), dtype)
        if key not in self._mask_cache:
            self._mask_cache[key] = upsample_mask(self._visible, size).to(dtype)
        return self._mask_cache[key]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- hooks -------------------------------------------------------------------------------------
    def _mask_output(self, module, args, output):
        if not self.active or not torch.is_tensor(output) or output.dim() != 5:
            return None
        return output * self.mask_at(output.shape[2:], output.dtype)

    def _save_running_stats(self, module, args):
        if self.active and module.training and getattr(module, "track_running_stats", False):
            self._saved_stats[id(module)] = (module.running_mean.clone(), module.running_var.clone(),
                                             module.num_batches_tracked.clone())

    def _visible_norm(self, module, args, output):
        if not self.active or args[0].dim() != 5:
            return None
        saved = self._saved_stats.pop(id(module), None)
        if saved is not None:  # undo the update the module made from all voxels
            with torch.no_grad():
                for buffer, value in zip((module.running_mean, module.running_var, module.num_batches_tracked),
                                         saved):
                    buffer.copy_(value)
        x = args[0]
        return visible_norm(module, x, self.mask_at(x.shape[2:], x.dtype))

    def _keep_visible_tokens(self, module, args):
        if not self.active:
            return None
        tokens, visible = args[0], self._visible.flatten(1)
        if tokens.dim() != 3 or tokens.shape[1] != visible.shape[1]:
            raise RuntimeError(
                f"sequence module {self.spec.sequence_module!r} must receive (B, L={visible.shape[1]}, C) tokens "
                f"of the deepest grid in raster order, got {tuple(tokens.shape)}"
            )
        kept, self._token_index = gather_visible_tokens(tokens, visible)
        return (kept,) + tuple(args[1:])

    def _scatter_tokens(self, module, args, output):
        if not self.active:
            return None
        return scatter_visible_tokens(output, self._token_index, self._visible[0].numel())

    def _record(self, name: str, module, args, output):
        if self.active:
            self.features[name] = output
