"""A torch Dataset over one Split: decode with the robust loader, transform, keep the index.

Decoding goes through `retrieval.images.open_image`, so a corrupt or missing file raises
ImageLoadError naming that file instead of an anonymous worker crash.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from retrieval.data.base import Split
from retrieval.images import open_image


class ImageDataset(Dataset):
    """Items are (image: (3, S, S) float tensor, label: int, index: int into the split).

    The index travels with the batch so embeddings can be put back in split order and so a
    failing image can be traced to its path.
    """

    def __init__(self, split: Split, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = open_image(self.split.paths[index])
        return self.transform(image), int(self.split.labels[index]), int(index)
