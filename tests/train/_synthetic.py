"""Synthetic prompted-segmentation data for the pipeline tests: bright squares on noise, tiny sizes."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class Squares(Dataset):
    """``{"image": (3, S, S) in [0, 1], "label": (S, S)}``: class 1 a bright square, class 2 a dimmer one."""

    def __init__(self, count: int, size: int = 32, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(count):
            label = torch.zeros(size, size, dtype=torch.long)
            for cls in (1, 2):
                side = int(torch.randint(size // 6, size // 3, (1,), generator=gen))
                y, x = torch.randint(0, size - side, (2,), generator=gen).tolist()
                label[y:y + side, x:x + side] = cls
            image = 0.1 * torch.rand(size, size, generator=gen) + 0.8 * (label == 1) + 0.45 * (label == 2)
            self.items.append({"image": image.clamp(0, 1).expand(3, -1, -1).clone(), "label": label})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]
