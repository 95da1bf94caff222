"""Fine-tuning check for MambaMIM: tissue segmentation from a pretrained vs a random encoder, same budget.

Labels of the held-out half (``x ≥ X/2``, one hemisphere of MNI152) are ignored in training; Dice is
measured there only. Loss: cross-entropy + soft Dice over the foreground classes,
``Dice_k = 2 Σ p_k y_k / (Σ p_k + Σ y_k)``. Both runs use the same head initialisation, crops, steps and
learning rate; only the encoder's starting weights differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._data import CropSampler
from .decoder import LightDecoder

__all__ = ["SegmentationHead", "SegmentationNet", "dice_scores", "segment_volume", "compare_finetuning"]

IGNORE = -1


class SegmentationHead(nn.Module):
    """``LightDecoder`` over multi-scale features: 1×1×1 projections, ×2 up-blocks with skips, logits."""

    def __init__(self, feature_channels: Sequence[int], feature_strides: Sequence[int], num_classes: int,
                 width: int | None = None):
        super().__init__()
        patch = feature_strides[-1]
        self.decoder = LightDecoder(patch, width or feature_channels[-1], num_classes)
        self.sources = {s: max(i for i, t in enumerate(feature_strides) if t == s)
                        for s in self.decoder.strides if s in feature_strides}
        self.proj = nn.ModuleDict({str(s): nn.Conv3d(feature_channels[i], self.decoder.width_at(s), 1)
                                   for s, i in self.sources.items()})

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.decoder({s: self.proj[str(s)](features[i]) for s, i in self.sources.items()})


class SegmentationNet(nn.Module):
    """``head(encoder(x))`` for an encoder that returns a list of features (``HybridMambaEncoder``)."""

    def __init__(self, encoder: nn.Module, head: SegmentationHead):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits, label, ignore_index=IGNORE)
    known = (label != IGNORE).unsqueeze(1)
    probs = logits.softmax(1) * known
    onehot = F.one_hot(label.clamp(min=0), logits.shape[1]).permute(0, 4, 1, 2, 3) * known
    dims = (0, 2, 3, 4)
    dice = 2 * (probs * onehot).sum(dims) / (probs.sum(dims) + onehot.sum(dims)).clamp(min=1e-6)
    return ce + 1 - dice[1:].mean()


@torch.no_grad()
def segment_volume(model: nn.Module, image: torch.Tensor, tile: int, device=None) -> torch.Tensor:
    """Label map ``(X, Y, Z)`` of ``image (X, Y, Z)`` from non-overlapping ``tile³`` windows (zero-padded)."""
    model.eval()
    size = image.shape
    pads = []
    for s in reversed(size):
        pads += [0, (-s) % tile]
    padded = F.pad(image, pads)
    out = torch.zeros(padded.shape, dtype=torch.long)
    for x in range(0, padded.shape[0], tile):
        for y in range(0, padded.shape[1], tile):
            for z in range(0, padded.shape[2], tile):
                window = (slice(x, x + tile), slice(y, y + tile), slice(z, z + tile))
                out[window] = model(padded[window][None, None].to(device)).argmax(1)[0].cpu()
    return out[: size[0], : size[1], : size[2]]


def dice_scores(prediction: torch.Tensor, label: torch.Tensor, region: torch.Tensor, num_classes: int):
    """Dice per foreground class inside ``region`` (bool); NaN when a class is absent from both."""
    scores = []
    for k in range(1, num_classes):
        p, y = (prediction == k) & region, (label == k) & region
        denom = p.sum() + y.sum()
        scores.append(float(2 * (p & y).sum() / denom) if denom > 0 else float("nan"))
    return scores


def compare_finetuning(encoders: dict[str, Callable[[], nn.Module]], image: torch.Tensor, label: torch.Tensor,
                       class_names: Sequence[str], steps: int, crop: int, batch_size: int, lr: float,
                       seed: int = 0, progress: Callable | None = None, device=None) -> dict[str, list[float]]:
    """Fine-tune one ``SegmentationNet`` per encoder factory with the same budget; held-out Dice each.

    Returns ``{name: [dice per foreground class]}`` and prints the scores side by side.
    """
    held_out = torch.zeros_like(label, dtype=torch.bool)
    held_out[label.shape[0] // 2:] = True
    train_label = label.masked_fill(held_out, IGNORE)
    sampler = CropSampler([image], crop, labels=[train_label])
    results = {}
    for name, build in encoders.items():
        encoder = build()
        torch.manual_seed(seed + 1)  # same head init for every encoder
        model = SegmentationNet(encoder, SegmentationHead(encoder.feature_channels, encoder.feature_strides,
                                                          len(class_names))).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        generator = torch.Generator().manual_seed(seed + 2)  # same crops for every encoder
        model.train()
        steps_iter = progress(range(steps), desc=f"fine-tune ({name})") if progress else range(steps)
        for _ in steps_iter:
            images, labels = sampler.sample(batch_size, generator)
            loss = _loss(model(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        prediction = segment_volume(model, image, crop, device)
        results[name] = dice_scores(prediction, label, held_out, len(class_names))
    names = list(results)
    print(f"\nheld-out Dice (voxels x >= {label.shape[0] // 2}, {steps} steps each)")
    print(f"{'class':<16}" + "".join(f"{n:>14}" for n in names))
    for k, cls in enumerate(class_names[1:]):
        print(f"{cls:<16}" + "".join(f"{results[n][k]:>14.4f}" for n in names))
    means = {n: sum(v) / len(v) for n, v in results.items()}
    print(f"{'mean':<16}" + "".join(f"{means[n]:>14.4f}" for n in names))
    return results
