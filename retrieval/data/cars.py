"""Cars196 (Stanford Cars): 196 car models, all-vs-all retrieval; classes 1-98 train, 99-196 test.

Read from `cars_annos.mat` (MATLAB struct array `annotations` with fields `relative_im_path`, e.g.
`car_ims/000001.jpg`, and `class`, 1-based) with scipy; the official `test` flag is ignored because
the metric-learning protocol splits by class. Labels are remapped to 0..97 within each split; the
model name from `class_names` (or the class number) is kept as the item id.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from retrieval.data._files import layout_error, require_file, resolve_root, split_by_class
from retrieval.data.base import RetrievalDataset

RECALL_KS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
NUM_TRAIN_CLASSES = 98  # classes 1..98 train, 99..196 test
ANNOTATIONS_FILE = "cars_annos.mat"

LAYOUT = """\
<root>/                      (or its sub-folder cars196/ or stanford_cars/)
  cars_annos.mat             struct array 'annotations': relative_im_path, class (1..196)
  car_ims/000001.jpg ...     relative_im_path is relative to <root>
"""


def _scalar(value: Any) -> Any:
    """MATLAB cells arrive as nested 1x1 arrays; unwrap to the Python value."""
    import numpy as np

    arr = np.asarray(value)
    while arr.dtype == object and arr.size == 1:
        arr = np.asarray(arr.reshape(-1)[0])
    if arr.size != 1:
        raise ValueError(f"expected a single value, got shape {arr.shape}")
    return arr.reshape(-1)[0].item() if hasattr(arr.reshape(-1)[0], "item") else arr.reshape(-1)[0]


def load_cars(root: str | os.PathLike[str]) -> RetrievalDataset:
    import numpy as np
    from scipy.io import loadmat  # scipy is slow to import; only this loader needs it

    name = "cars"
    base = resolve_root(root, ANNOTATIONS_FILE, ("cars196", "stanford_cars", "CARS_196"), name, LAYOUT)
    mat_path = require_file(base / ANNOTATIONS_FILE, name, LAYOUT)
    try:
        mat = loadmat(str(mat_path))
    except Exception as exc:  # scipy raises several unrelated types for unreadable files
        raise layout_error(name, f"{mat_path} is not a readable MATLAB file ({exc})", LAYOUT) from exc
    ann = mat.get("annotations")
    fields = ann.dtype.names if isinstance(ann, np.ndarray) and ann.dtype.names else ()
    if "relative_im_path" not in fields or "class" not in fields:
        raise layout_error(
            name, f"{mat_path} has no struct array 'annotations' with fields relative_im_path and class", LAYOUT
        )
    class_names: dict[int, str] = {}
    if isinstance(mat.get("class_names"), np.ndarray):
        for i, cell in enumerate(mat["class_names"].reshape(-1), start=1):
            try:
                class_names[i] = str(_scalar(cell))
            except ValueError:
                pass

    def labelled() -> Iterator[tuple[Path, int, str]]:
        for i, record in enumerate(ann.reshape(-1)):
            try:
                rel = str(_scalar(record["relative_im_path"]))
                cls = int(_scalar(record["class"]))
            except (ValueError, TypeError) as exc:
                raise layout_error(name, f"{mat_path}: annotation {i} is malformed ({exc})", LAYOUT) from exc
            if not 1 <= cls <= 196:
                raise layout_error(name, f"{mat_path}: annotation {i} has class {cls}, outside 1..196", LAYOUT)
            yield base / rel, cls, class_names.get(cls, str(cls))

    return split_by_class(name, base, labelled(), NUM_TRAIN_CLASSES, 196, LAYOUT, RECALL_KS, where=f"{mat_path}: ")
