"""The embedded demo dataset: procedurally drawn "product photos", written in the In-Shop layout.

Each class is one product: a shape family (bottle, shirt, ring, flower, ...) with a two-colour palette
and a surface pattern (stripes, dots, checks, ...). Classes share attribute values with one
another (many red things, many bottles, many striped things), so telling them apart needs the whole
combination. Each photo varies what a product photo varies: pose (rotation, mirror, aspect), scale,
position, colour and lighting, background (gradients between random light colours), clutter (at most one other small
object, behind the product), then JPEG compression.
An untrained network therefore confuses classes, while a trained one learns the invariances.

Train classes and test classes are disjoint products (test items are never seen in training); each
test item's photos are split half into the query set and half into the gallery, as In-Shop does.
Everything is derived from the seed: the same seed gives byte-identical images and lists.
"""

from __future__ import annotations

import colorsys
import functools
import io
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from retrieval.atomic import swap_in_folder
from retrieval.errors import UsageError

MARKER_FILE = "demo.json"
GENERATOR_VERSION = 3  # bump when the drawing or its parameters change: older demo folders are redrawn
CLUTTER_MAX = 1  # unrelated small objects per photo: 0..CLUTTER_MAX
# Occlusion levers, off: a clutter object in front of the product (0.15 in version 2) or a bar across it (0.1) cost
# the demo's from-scratch embedder about 9 points of R@1 at the same budget (50.0 -> 58.8 without them).
FRONT_P = 0.0  # chance that a clutter object lies partly in front of the product
OCCLUDER_P = 0.0  # chance of a thin bar across the product
# Backdrops: gradients between two random colours, each channel at least LIGHT_FLOOR on a light backdrop (studio
# shots, as In-Shop's) and anything on a dark one. Dark, saturated backdrops (40% in version 2) camouflaged products of
# the same colour: with the demo's training budget, R@1 on the test products was 41 with 15% dark backdrops and 50
# with none (occlusion still on).
LIGHT_BACKDROP_P = 1.0
LIGHT_FLOOR = 170.0

# (name, rgb) of the palette colours; primary colours are the chromatic ones plus brown/black.
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (214, 39, 40)),
    ("orange", (255, 127, 14)),
    ("yellow", (240, 210, 40)),
    ("lime", (160, 220, 50)),
    ("green", (44, 160, 44)),
    ("teal", (23, 150, 140)),
    ("cyan", (60, 200, 230)),
    ("blue", (31, 90, 200)),
    ("navy", (20, 30, 110)),
    ("purple", (128, 60, 180)),
    ("magenta", (220, 50, 170)),
    ("pink", (250, 160, 190)),
    ("brown", (120, 75, 40)),
    ("black", (25, 25, 25)),
    ("white", (245, 245, 240)),
    ("gray", (140, 140, 140)),
)
PRIMARY = tuple(range(14))  # everything but white and gray
FAMILIES = (
    "circle", "square", "triangle", "flower", "hexagon", "cross", "ring", "heart",
    "bottle", "shirt", "crescent", "arrow", "diamond", "lshape",
)  # fmt: skip
PATTERNS = ("solid", "stripes", "dots", "checks", "split", "rings", "gradient")


@dataclass(frozen=True)
class DemoClass:
    """One product of the demo catalogue."""

    item_id: str
    family: str
    primary: str
    secondary: str
    pattern: str
    split: str  # "train" or "test"


def _choose_classes(seed: int, num_train: int, num_test: int) -> list[DemoClass]:
    rng = np.random.default_rng([seed, 0])
    seen: set[tuple[int, int, int, int]] = set()
    combos: list[tuple[int, int, int, int]] = []
    while len(combos) < num_train + num_test:
        fam = int(rng.integers(len(FAMILIES)))
        a = int(rng.choice(PRIMARY))
        b = int(rng.integers(len(COLOURS)))
        pat = int(rng.integers(len(PATTERNS)))
        if b == a:
            continue
        if PATTERNS[pat] == "solid":
            b = a  # a solid product has one colour; keep the key canonical
        key = (fam, a, b, pat)
        if key not in seen:
            seen.add(key)
            combos.append(key)
    return [
        DemoClass(
            item_id=f"id_{i + 1:08d}",
            family=FAMILIES[fam],
            primary=COLOURS[a][0],
            secondary=COLOURS[b][0],
            pattern=PATTERNS[pat],
            split="train" if i < num_train else "test",
        )
        for i, (fam, a, b, pat) in enumerate(combos)
    ]


# --- drawing -------------------------------------------------------------------------------------
# Shapes are membership tests on object coordinates (u, v) in about [-1, 1]^2, evaluated per pixel,
# so rotation, mirroring and stretching are just a change of coordinates.


def _regular_polygon(r: np.ndarray, th: np.ndarray, n: int, radius: float) -> np.ndarray:
    sector = 2 * np.pi / n
    return r * np.cos(np.mod(th, sector) - sector / 2) < radius * np.cos(np.pi / n)


def _shape_mask(family: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.sqrt(u * u + v * v)
    th = np.arctan2(v, u)
    au, av = np.abs(u), np.abs(v)
    if family == "circle":
        return r < 0.9
    if family == "square":
        return np.maximum(au, av) < 0.72
    if family == "triangle":
        return _regular_polygon(r, th + np.pi / 2, 3, 0.95)
    if family == "flower":
        return r < 0.62 + 0.33 * np.cos(5 * th)
    if family == "hexagon":
        return _regular_polygon(r, th, 6, 0.9)
    if family == "cross":
        return ((au < 0.28) & (av < 0.9)) | ((av < 0.28) & (au < 0.9))
    if family == "ring":
        return (r < 0.92) & (r > 0.55)
    if family == "heart":
        x, y = u * 1.25, -v * 1.25 + 0.2
        return (x * x + y * y - 1) ** 3 - x * x * y**3 < 0
    if family == "bottle":
        body = (au < 0.42) & (v > -0.3) & (v < 0.95)
        shoulder = (u * u / 0.18 + (v + 0.3) ** 2 / 0.09 < 1) & (v <= -0.3)
        neck = (au < 0.15) & (v > -0.95) & (v <= -0.3)
        return body | shoulder | neck
    if family == "shirt":
        torso = (au < 0.45) & (v > -0.6) & (v < 0.9)
        sleeves = (v > -0.6) & (v < -0.1 + 0.5 * (au - 0.45)) & (au < 0.95) & (v < -0.05)
        collar = (u * u + (v + 0.62) ** 2) < 0.04
        return (torso | sleeves) & ~collar
    if family == "crescent":
        return (r < 0.9) & ((u - 0.38) ** 2 + (v + 0.12) ** 2 > 0.5)
    if family == "arrow":
        shaft = (u > -0.9) & (u < 0.2) & (av < 0.2)
        head = (u >= 0.2) & (u < 0.95) & (av < 0.6 * (0.95 - u) / 0.75)
        return shaft | head
    if family == "diamond":
        return au / 0.7 + av / 0.95 < 1
    if family == "lshape":
        return ((u > -0.7) & (u < -0.2) & (av < 0.85)) | ((u > -0.7) & (u < 0.7) & (v > 0.35) & (v < 0.85))
    raise ValueError(f"unknown shape family {family!r}")


def _pattern_select(pattern: str, u: np.ndarray, v: np.ndarray, freq: float) -> np.ndarray:
    """Per-pixel weight of the secondary colour in [0, 1]."""
    if pattern == "solid":
        return np.zeros_like(u)
    if pattern == "stripes":
        return (np.floor(v * freq) % 2).astype(np.float32)
    if pattern == "dots":
        fu, fv = np.mod(u * freq, 1.0) - 0.5, np.mod(v * freq, 1.0) - 0.5
        return (fu * fu + fv * fv < 0.09).astype(np.float32)
    if pattern == "checks":
        return ((np.floor(u * freq) + np.floor(v * freq)) % 2).astype(np.float32)
    if pattern == "split":
        return (u > 0).astype(np.float32)
    if pattern == "rings":
        return (np.floor(np.sqrt(u * u + v * v) * freq) % 2).astype(np.float32)
    if pattern == "gradient":
        return np.clip((v + 1) / 2, 0, 1).astype(np.float32)
    raise ValueError(f"unknown pattern {pattern!r}")


def _jitter_colour(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float = 1.0) -> np.ndarray:
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    h = (h + rng.uniform(-0.035, 0.035) * amount) % 1.0
    s = float(np.clip(s * rng.uniform(1 - 0.25 * amount, 1 + 0.15 * amount), 0, 1))
    v = float(np.clip(v * rng.uniform(1 - 0.25 * amount, 1 + 0.15 * amount), 0, 1))
    return np.asarray(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255.0


def _object_coords(
    xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, radius: float, angle: float, stretch: float, mirror: bool
) -> tuple[np.ndarray, np.ndarray]:
    dx, dy = (xs - cx) / radius, (ys - cy) / radius
    c, s = np.cos(angle), np.sin(angle)
    u = (c * dx + s * dy) * stretch
    v = (-s * dx + c * dy) / stretch
    return (-u if mirror else u), v


def _paint_object(
    canvas: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    family: str,
    pattern: str,
    col_a: np.ndarray,
    col_b: np.ndarray,
    cx: float,
    cy: float,
    radius: float,
    angle: float,
    stretch: float,
    mirror: bool,
    freq: float,
    shade: float,
) -> None:
    # Only the object's bounding window is evaluated (|u|, |v| <= 1 lies within 1.7 radii of the centre).
    size = canvas.shape[0]
    reach = 1.7 * radius
    y0, y1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 1)
    x0, x1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 1)
    if y0 >= y1 or x0 >= x1:
        return
    window = canvas[y0:y1, x0:x1]
    u, v = _object_coords(xs[y0:y1, x0:x1], ys[y0:y1, x0:x1], cx, cy, radius, angle, stretch, mirror)
    mask = _shape_mask(family, u, v)
    if not mask.any():
        return
    w = _pattern_select(pattern, u[mask], v[mask], freq)[:, None]
    colour = col_a * (1 - w) + col_b * w
    # simple lighting: brighter towards one side of the object
    light = 1.0 + shade * np.clip(-(u[mask] + v[mask]) * 0.5, -1, 1)[:, None]
    window[mask] = np.clip(colour * light, 0, 255)


@functools.lru_cache(maxsize=4)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) pixel coordinates, (size, size) float32 each; read-only, shared between images."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    ys.flags.writeable = False
    xs.flags.writeable = False
    return ys, xs


def _background(size: int, rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    light = rng.random() < LIGHT_BACKDROP_P
    low = LIGHT_FLOOR if light else 0.0
    c1 = rng.uniform(low, 255, size=3).astype(np.float32)
    c2 = rng.uniform(low, 255, size=3).astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    t = xs * np.float32(np.cos(ang) / (2 * size)) + ys * np.float32(np.sin(ang) / (2 * size)) + np.float32(0.5)
    return c1 + (c2 - c1) * np.clip(t, 0, 1)[..., None]


def _random_object(rng: np.random.Generator, s: int) -> tuple:
    """`_paint_object` arguments for one smaller unrelated object (clutter) on an s x s canvas."""
    return (
        FAMILIES[int(rng.integers(len(FAMILIES)))],
        PATTERNS[int(rng.integers(len(PATTERNS)))],
        _jitter_colour(COLOURS[int(rng.integers(len(COLOURS)))][1], rng),
        _jitter_colour(COLOURS[int(rng.integers(len(COLOURS)))][1], rng),
        float(rng.uniform(0, s)),
        float(rng.uniform(0, s)),
        float(rng.uniform(0.08, 0.17) * s),
        float(rng.uniform(0, 2 * np.pi)),
        float(rng.uniform(0.8, 1.25)),
        bool(rng.random() < 0.5),
        float(rng.uniform(2, 5)),
        float(rng.uniform(0, 0.3)),
    )


def _paint_product(
    canvas: np.ndarray, xs: np.ndarray, ys: np.ndarray, cls: DemoClass, rng: np.random.Generator, s: int
) -> tuple[float, float, float]:
    """Paint the class's object somewhere on the canvas, in its own pose; returns its centre and radius."""
    colour_of = dict(COLOURS)
    radius = float(rng.uniform(0.26, 0.42) * s)
    margin = radius * 0.6
    cx = float(rng.uniform(margin, s - margin))
    cy = float(rng.uniform(margin, s - margin))
    _paint_object(
        canvas,
        xs,
        ys,
        cls.family,
        cls.pattern,
        _jitter_colour(colour_of[cls.primary], rng),
        _jitter_colour(colour_of[cls.secondary], rng),
        cx,
        cy,
        radius,
        float(rng.uniform(-np.pi / 6, np.pi / 6)),
        float(rng.uniform(0.8, 1.25)),
        bool(rng.random() < 0.5),
        float(rng.uniform(2.5, 4.0)),
        float(rng.uniform(0, 0.35)),
    )
    return cx, cy, radius


def _develop(canvas: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Box-downsample the supersampled canvas, then global illumination, sensor noise / grain and maybe blur."""
    canvas *= np.float32(rng.uniform(0.8, 1.15))
    big = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    small = np.asarray(big.reduce(2), dtype=np.float32)
    small += rng.standard_normal(small.shape, dtype=np.float32) * np.float32(rng.uniform(2, 7))
    img = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.2:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.4, 1.0))))
    return img


def _draw_photo(cls: DemoClass, rng: np.random.Generator, image_size: int) -> Image.Image:
    s = image_size * 2  # supersample, then box-downsample for anti-aliased edges
    ys, xs = _pixel_grid(s)
    canvas = _background(s, rng, xs, ys)

    # clutter: a few smaller unrelated objects, some behind the product, some partly in front
    in_front: list[tuple] = []
    for _ in range(int(rng.integers(0, CLUTTER_MAX + 1))):
        spec = _random_object(rng, s)
        if rng.random() < FRONT_P:
            in_front.append(spec)
        else:
            _paint_object(canvas, xs, ys, *spec)
    cx, cy, radius = _paint_product(canvas, xs, ys, cls, rng, s)
    for spec in in_front:
        _paint_object(canvas, xs, ys, *spec)

    # occasional occluder: a thin bar of a random colour across the photo, through the product
    if rng.random() < OCCLUDER_P:
        ang = rng.uniform(0, np.pi)
        off = rng.uniform(-0.6, 0.6) * radius
        dist = (xs - cx) * np.cos(ang) + (ys - cy) * np.sin(ang) - off
        bar = np.abs(dist) < rng.uniform(0.08, 0.18) * radius
        canvas[bar] = rng.uniform(0, 255, size=3).astype(np.float32)
    return _develop(canvas, rng)


# --- writing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoParams:
    seed: int = 0
    num_train_classes: int = 400
    num_test_classes: int = 40
    images_per_class: int = 4
    image_size: int = 64
    test_images_per_class: int | None = 12  # None: as many as a train product
    version: int = GENERATOR_VERSION

    def photos_of(self, cls: DemoClass) -> int:
        """How many photos a product gets: test products may get more (half queries, half gallery)."""
        if cls.split == "test" and self.test_images_per_class is not None:
            return self.test_images_per_class
        return self.images_per_class


def _is_complete(root: Path, params: DemoParams) -> bool:
    marker = root / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return meta.get("params") == asdict(params) and (root / "Eval" / "list_eval_partition.txt").is_file()


def _write_demo(out: Path, params: DemoParams, classes: list[DemoClass], progress: bool) -> int:
    rows: list[tuple[str, str, str]] = []
    jobs = [(ci, cls, j) for ci, cls in enumerate(classes) for j in range(params.photos_of(cls))]
    it = jobs
    if progress:
        from tqdm import tqdm

        it = tqdm(jobs, desc="drawing demo images", unit="img")
    for ci, cls, j in it:
        rng = np.random.default_rng([params.seed, 1, ci, j])
        img = _draw_photo(cls, rng, params.image_size)
        image_name = f"img/DEMO/{cls.family}/{cls.item_id}/{j + 1:02d}_{cls.pattern}.jpg"
        path = out / "Img" / image_name
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(80, 96)))
        path.write_bytes(buf.getvalue())
        status = "train" if cls.split == "train" else ("query" if j < params.photos_of(cls) // 2 else "gallery")
        rows.append((image_name, cls.item_id, status))
    eval_dir = out / "Eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    lines = [str(len(rows)), "image_name item_id evaluation_status"] + [" ".join(r) for r in rows]
    (eval_dir / "list_eval_partition.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(rows)


def generate_demo(
    root: str | os.PathLike[str],
    seed: int = 0,
    num_train_classes: int = 400,
    num_test_classes: int = 40,
    images_per_class: int = 4,
    image_size: int = 64,
    progress: bool = False,
    test_images_per_class: int | None = 12,
) -> Path:
    """Write the demo dataset into `root` (In-Shop layout) and return `root`.

    Defaults: 400 train products x 4 photos and 40 test products x 12 photos, 64 px = 2,080 JPEGs (~11 MB):
    1,600 train, 240 query, 240 gallery images. Many products with few photos each, so that training sees
    many identities; test products keep 12 photos so that each has 6 gallery photos to find. A few ms of one CPU
    core per photo.
    `test_images_per_class` None gives test products as many photos as train products.

    Idempotent: a folder already holding a complete demo of the same parameters is returned as is.
    Atomic: images are drawn into a temporary sibling folder that is renamed into place at the end,
    so an interrupted run never leaves a half-written dataset behind. A previous demo with other
    parameters is replaced; a non-empty folder that is not a demo is never touched.
    """
    _check_request(num_train_classes, num_test_classes, images_per_class, test_images_per_class)
    root = Path(root).expanduser()
    params = DemoParams(seed, num_train_classes, num_test_classes, images_per_class, image_size, test_images_per_class)
    if _is_complete(root, params):
        return root
    if root.exists() and any(root.iterdir()) and not (root / MARKER_FILE).exists():
        raise FileExistsError(
            f"{root} is not empty and holds no demo dataset ({MARKER_FILE} missing); "
            "choose an empty folder for the demo data"
        )

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _draw_demo(tmp, params, progress)
        if not _is_complete(root, params):  # another process may have finished the same demo meanwhile
            swap_in_folder(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _check_request(
    num_train_classes: int, num_test_classes: int, images_per_class: int, test_images_per_class: int | None
) -> None:
    if num_train_classes < 1 or num_test_classes < 1:
        raise UsageError("the demo needs at least one train class and one test class")
    if images_per_class < 2 or (test_images_per_class is not None and test_images_per_class < 2):
        raise UsageError(
            "images_per_class and test_images_per_class must be >= 2 (test items need a query and a gallery image)"
        )
    if len(FAMILIES) * len(PRIMARY) * len(COLOURS) * len(PATTERNS) // 4 < num_train_classes + num_test_classes:
        raise UsageError("too many demo classes requested")


def _draw_demo(out: Path, params: DemoParams, progress: bool) -> None:
    """Draw the images and the partition file into `out`, then the marker with the parameters and catalogue."""
    classes = _choose_classes(params.seed, params.num_train_classes, params.num_test_classes)
    start = time.perf_counter()
    n = _write_demo(out, params, classes, progress)
    meta = {
        "params": asdict(params),
        "num_images": n,
        "generation_seconds": round(time.perf_counter() - start, 2),
        "classes": [asdict(c) for c in classes],
    }
    (out / MARKER_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def demo_classes(root: str | os.PathLike[str]) -> list[DemoClass]:
    """The catalogue a demo folder was drawn from (for display: family, colours, pattern per item)."""
    meta = json.loads((Path(root) / MARKER_FILE).read_text(encoding="utf-8"))
    return [DemoClass(**c) for c in meta["classes"]]
