"""Transforms and the image Dataset: the torch eval pipeline equals the torch-free one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.data.base import Split
from retrieval.data.loading import ImageDataset
from retrieval.data.transforms import eval_transform, eval_transform_for, train_transform
from retrieval.images import ImageLoadError, open_image
from retrieval.preprocess import Preprocessing, preprocess_eval
from tests.fakes import write_image, write_nasty_images


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


@pytest.mark.parametrize("size", [(80, 60), (60, 97), (64, 64), (40, 30)])
def test_eval_transform_matches_torch_free_preprocessing(size):
    prep = Preprocessing(image_size=48, resize_size=56)
    img = _photo(*size)
    ours = eval_transform_for(prep)(img).numpy()
    reference = preprocess_eval(img, prep)
    assert ours.shape == reference.shape == (3, 48, 48)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_pixel_normalisation_is_bit_identical_to_torchvision() -> None:
    """Query embeddings must match gallery embeddings computed through torchvision's ToTensor + Normalize."""
    import torchvision.transforms.functional as TF

    from retrieval.preprocess import to_chw_float

    prep = Preprocessing(image_size=40, resize_size=40)
    img = _photo(40, 40, seed=3)
    expected = TF.normalize(TF.to_tensor(img), list(prep.mean), list(prep.std)).numpy()
    ours = to_chw_float(img, prep)
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    assert np.array_equal(ours, expected)


def test_eval_transform_is_normalised_and_deterministic():
    img = Image.new("RGB", (50, 40), (124, 116, 104))  # ImageNet mean colour
    out = eval_transform(36, 32)(img)
    assert out.shape == (3, 32, 32)
    assert out.abs().max() < 0.02


def test_train_transform_is_random_but_shaped():
    img = _photo(90, 70)
    t = train_transform(32)
    torch.manual_seed(0)
    a = t(img)
    b = t(img)
    assert a.shape == b.shape == (3, 32, 32)
    assert not torch.equal(a, b)
    torch.manual_seed(0)
    assert torch.equal(t(img), a)  # reproducible under the torch seed


def test_image_dataset_returns_tensor_label_index(tmp_path):
    paths = tuple(write_image(tmp_path / f"{i}.jpg", label=i % 2, index=i) for i in range(3))
    ds = ImageDataset(Split("x", paths, (0, 1, 0)), eval_transform(36, 32))
    assert len(ds) == 3
    x, y, i = ds[1]
    assert x.shape == (3, 32, 32) and y == 1 and i == 1
    expected = preprocess_eval(open_image(paths[1]), Preprocessing(32, 36))
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-5)


def test_image_dataset_names_a_corrupt_file(tmp_path):
    nasty = write_nasty_images(tmp_path)
    ds = ImageDataset(Split("x", (nasty["grayscale"], nasty["truncated"]), (0, 0)), eval_transform(36, 32))
    assert ds[0][0].shape == (3, 32, 32)  # grayscale is fine
    with pytest.raises(ImageLoadError, match="truncated.jpg"):
        ds[1]
