"""Image transforms of the training recipe (torchvision, on PIL images).

train: RandomResizedCrop(image_size) + horizontal flip + ImageNet normalisation.
eval:  Resize(resize_size, short side) + CenterCrop(image_size) + normalisation; pixel-identical to the
torch-free `retrieval.preprocess.preprocess_eval`, so ONNX serving sees what the torch model saw.
"""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T

from retrieval.config import IMAGENET_MEAN, IMAGENET_STD
from retrieval.preprocess import Preprocessing


def train_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale_min: float = 0.08,
) -> T.Compose:
    """PIL RGB image -> (3, image_size, image_size) float tensor, randomly cropped and flipped.

    `scale_min` is the smallest crop area kept; torchvision's 0.08 is the paper's, small-image data
    (the demo) needs larger crops so that most crops still show the object.
    """
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(scale_min, 1.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def eval_transform(
    resize_size: int,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """PIL RGB image -> (3, image_size, image_size) float tensor, deterministic."""
    return T.Compose(
        [
            T.Resize(resize_size),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def eval_transform_for(prep: Preprocessing) -> T.Compose:
    """The eval transform matching a stored Preprocessing (checkpoint, index or ONNX metadata)."""
    return eval_transform(prep.resize_size, prep.image_size, prep.mean, prep.std)
