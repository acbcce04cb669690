"""open_image on the files users actually upload: every readable one comes out upright RGB,
every broken one raises ImageLoadError naming the file."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.images import ImageLoadError, open_image
from tests.fakes import READABLE_NASTY, UNREADABLE_NASTY, write_nasty_images


@pytest.fixture(scope="module")
def nasty(tmp_path_factory):
    return write_nasty_images(tmp_path_factory.mktemp("nasty"))


@pytest.mark.parametrize("name", READABLE_NASTY)
def test_readable_files_become_rgb(nasty, name):
    img = open_image(nasty[name])
    assert img.mode == "RGB"
    assert np.asarray(img).shape[2] == 3


def test_bytes_and_path_give_same_pixels(nasty):
    from_path = np.asarray(open_image(nasty["cmyk"]))
    from_bytes = np.asarray(open_image(nasty["cmyk"].read_bytes()))
    assert np.array_equal(from_path, from_bytes)


def test_exif_rotation_is_applied(nasty):
    img = open_image(nasty["exif_rotated"])
    assert img.size == (20, 40)  # stored 40 x 20, displayed rotated by 90 degrees
    arr = np.asarray(img).astype(int)
    right, left = arr[:, 15], arr[:, 4]
    assert right[:, 0].mean() > 200 and right[:, 2].mean() < 60  # stored top (red) is now on the right
    assert left[:, 2].mean() > 200 and left[:, 0].mean() < 60


def test_sixteen_bit_keeps_contrast(nasty):
    arr = np.asarray(open_image(nasty["sixteen_bit"])).astype(int)
    # values 1000..3000 span the full 8-bit range instead of clipping to white
    assert arr.max() - arr.min() > 200
    assert arr[:, 0].mean() < arr[:, -1].mean()


def test_transparency_is_composited_on_white(nasty):
    rgba = np.asarray(open_image(nasty["rgba"])).astype(int)
    assert tuple(rgba[0, 0]) == pytest.approx((255, 127, 127), abs=2)  # half-transparent red over white
    pal = np.asarray(open_image(nasty["palette_transparent"])).astype(int)
    assert tuple(pal[0, 0]) == (255, 255, 255)  # transparent index -> white, not black
    assert tuple(pal[16, 16]) == (0, 200, 0)


def test_cmyk_colour_is_converted(nasty):
    arr = np.asarray(open_image(nasty["cmyk"])).astype(int)
    r, g, b = arr.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60  # C=0 M=Y=255 K=0 is red


@pytest.mark.parametrize("name", UNREADABLE_NASTY)
def test_broken_files_raise_naming_the_file(nasty, name):
    with pytest.raises(ImageLoadError) as err:
        open_image(nasty[name])
    assert str(nasty[name]) in str(err.value)


def test_huge_image_refused_before_decoding(nasty):
    # the file has a 9000 x 9000 header but no valid pixel data: an error about its size
    # (not about corrupt data) proves the limit is checked before decoding
    with pytest.raises(ImageLoadError, match="exceeds the limit"):
        open_image(nasty["huge"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        open_image(tmp_path / "nope.jpg")


def test_folder_scans_list_images_and_skip_hidden_entries(tmp_path: Path) -> None:
    from retrieval.image_files import image_files, list_images

    for rel in ("b/2.JPG", "a/1.png", ".cache/3.jpg", "a/.4.jpg", "a/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    expected = [tmp_path / "a/1.png", tmp_path / "b/2.JPG"]
    assert image_files(tmp_path) == expected
    assert list_images([tmp_path]) == expected
