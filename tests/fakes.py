"""Tiny fake copies of the official dataset layouts, and a set of awkward image files.

Every function is deterministic (same arguments -> same bytes) and fast (32 px images), so any
test can build a dataset in a tmp_path. Each make_* returns the folder to pass to load_dataset.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def tiny_image(label: int, index: int, size: int = 32) -> Image.Image:
    """A solid colour picked by `label`, plus index-seeded noise: same class, similar colour."""
    rng = np.random.default_rng([label, index])
    base = np.random.default_rng([label, 7919]).integers(30, 226, size=3)
    noise = rng.integers(-25, 26, size=(size, size, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def write_image(path: Path, label: int, index: int, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    tiny_image(label, index, size).save(path, format=fmt)
    return path


def make_fake_cub(root: Path, train_classes: int = 3, test_classes: int = 3, per_class: int = 4, size: int = 32) -> Path:
    """CUB_200_2011 layout with classes 1..train_classes and 101..100+test_classes; returns the CUB_200_2011 folder."""
    base = Path(root) / "CUB_200_2011"
    classes = [*range(1, train_classes + 1), *range(101, 101 + test_classes)]
    images, labels = [], []
    image_id = 0
    for cls in classes:
        folder = f"{cls:03d}.Bird_{cls}"
        for j in range(per_class):
            image_id += 1
            rel = f"{folder}/Bird_{cls}_{j:04d}_{image_id}.jpg"
            write_image(base / "images" / rel, cls, j, size)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cls}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return base


def make_fake_cars(root: Path, train_classes: int = 3, test_classes: int = 3, per_class: int = 4, size: int = 32) -> Path:
    """cars_annos.mat (a real MATLAB file written by scipy) + car_ims/; classes 1.. and 99..; returns root."""
    from scipy.io import savemat

    root = Path(root)
    classes = [*range(1, train_classes + 1), *range(99, 99 + test_classes)]
    rows = []
    n = 0
    for cls in classes:
        for j in range(per_class):
            n += 1
            rel = f"car_ims/{n:06d}.jpg"
            write_image(root / rel, cls, j, size)
            rows.append((rel, cls, n % 2))
    fields = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
              ("class", "O"), ("test", "O")]  # fmt: skip
    ann = np.zeros((1, len(rows)), dtype=fields)
    for i, (rel, cls, test) in enumerate(rows):
        ann[0, i] = (rel, np.uint8(1), np.uint8(2), np.uint16(size - 1), np.uint16(size - 2), np.uint8(cls), np.uint8(test))
    class_names = np.empty((1, 196), dtype=object)
    for c in range(196):
        class_names[0, c] = f"Car Model {c + 1}"
    savemat(str(root / "cars_annos.mat"), {"annotations": ann, "class_names": class_names})
    return root


def make_fake_sop(root: Path, train_classes: int = 4, test_classes: int = 4, per_class: int = 3, size: int = 32) -> Path:
    """Stanford_Online_Products layout; train class ids 1.., test ids 11319..; returns the SOP folder."""
    base = Path(root) / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path"
    image_id = 0
    for file_name, first, count in (("Ebay_train.txt", 1, train_classes), ("Ebay_test.txt", 11319, test_classes)):
        lines = [header]
        for cls in range(first, first + count):
            super_name = ("bicycle_final", "chair_final", "mug_final")[cls % 3]
            for j in range(per_class):
                image_id += 1
                rel = f"{super_name}/{cls}_{j}.JPG"
                write_image(base / rel, cls, j, size)
                lines.append(f"{image_id} {cls} {cls % 3 + 1} {rel}")
        (base / file_name).write_text("\n".join(lines) + "\n")
    return base


def make_fake_inshop(root: Path, train_items: int = 4, test_items: int = 4, per_item: int = 4, size: int = 32) -> Path:
    """In-Shop layout (count line, header, train/query/gallery rows); each test item has half its
    images in query and half in gallery; item ids are id_00000001.. with test ids after train ids; returns root."""
    root = Path(root)
    rows = []
    for item in range(1, train_items + test_items + 1):
        item_id = f"id_{item:08d}"
        for j in range(per_item):
            name = f"img/WOMEN/Dresses/{item_id}/{j + 1:02d}_{j % 4 + 1}_front.jpg"
            write_image(root / "Img" / name, item, j, size)
            if item <= train_items:
                status = "train"
            else:
                status = "query" if j < per_item // 2 else "gallery"
            rows.append(f"{name}   {item_id}   {status}")
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    text = f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n"
    (root / "Eval" / "list_eval_partition.txt").write_text(text)
    return root


def make_image_folder(root: Path, classes: int = 4, per_class: int = 3, size: int = 32) -> Path:
    """One sub-folder per class (class_00, class_01, ...), mixed .jpg/.png files; returns root."""
    root = Path(root)
    for c in range(classes):
        for j in range(per_class):
            write_image(root / f"class_{c:02d}" / f"img_{j:03d}.{'png' if j % 2 else 'jpg'}", c, j, size)
    return root


# --- awkward images ------------------------------------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (invalid) body: a bomb that must be refused unread."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def write_nasty_images(folder: Path) -> dict[str, Path]:
    """Write the image files users upload that naive loaders get wrong; returns name -> path.

    Readable (open_image must give an RGB image):
      grayscale (L, 40x30), rgba (half-transparent red on nothing -> pink on white), palette_transparent
      (P with a transparent index), cmyk (CMYK JPEG), sixteen_bit (I;16 PNG with values 1000..3000,
      contrast must survive), exif_rotated (stored 40 wide x 20 high, EXIF orientation 6: upright it is
      20 wide x 40 high, red half on the right).
    Unreadable (open_image must raise ImageLoadError naming the file):
      truncated (a JPEG cut in half), not_an_image (text bytes with a .jpg name),
      huge (PNG header claiming 9000 x 9000 pixels, over open_image's limit but under Pillow's own bomb check; must be refused before decoding).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    gray = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))
    out["grayscale"] = folder / "grayscale.png"
    Image.fromarray(gray, "L").save(out["grayscale"])

    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 128
    out["rgba"] = folder / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(out["rgba"])

    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * (254 * 3))
    pal.paste(1, (8, 8, 24, 24))
    out["palette_transparent"] = folder / "palette_transparent.png"
    pal.save(out["palette_transparent"], transparency=0)

    out["cmyk"] = folder / "cmyk.jpg"
    Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(out["cmyk"], format="JPEG", quality=95)

    sixteen = np.tile(np.linspace(1000, 3000, 32).astype(np.uint16), (16, 1))
    out["sixteen_bit"] = folder / "sixteen_bit.png"
    Image.fromarray(sixteen).save(out["sixteen_bit"])

    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:10] = (255, 0, 0)  # top half red in storage; orientation 6 turns the top to the right
    stored[10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    out["exif_rotated"] = folder / "exif_rotated.jpg"
    Image.fromarray(stored, "RGB").save(out["exif_rotated"], format="JPEG", quality=95, exif=exif.tobytes())

    buf = io.BytesIO()
    noisy = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy, "RGB").save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    out["truncated"] = folder / "truncated.jpg"
    out["truncated"].write_bytes(data[: len(data) // 2])

    out["not_an_image"] = folder / "not_an_image.jpg"
    out["not_an_image"].write_bytes(b"this is a text file, not a photo\n" * 4)

    out["huge"] = folder / "huge.png"
    out["huge"].write_bytes(_png_header_only(9000, 9000))
    return out


READABLE_NASTY = ("grayscale", "rgba", "palette_transparent", "cmyk", "sixteen_bit", "exif_rotated")
UNREADABLE_NASTY = ("truncated", "not_an_image", "huge")
