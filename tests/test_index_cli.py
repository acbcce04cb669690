"""`retrieval index` is one command with several jobs (build, add, edit, from a vector file, from embedding parts):
the flags pick exactly one, with the precedence users rely on, and each job refuses its own mistakes first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retrieval.cli import app
from tests.fakes import make_image_folder

TINY = ["--untrained", "--arch", "resnet18", "--embedding-size", "16", "--image-size", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("jobs")
    np.save(base / "emb.npy", np.eye(4, dtype=np.float32))
    (base / "emb.txt").write_text("not vectors\n")
    (base / "not-parts").mkdir()
    images = make_image_folder(base / "images", classes=1, per_class=1)
    return {"base": base, "npy": base / "emb.npy", "txt": base / "emb.txt", "dir": base / "not-parts",
            "images": images, "missing": base / "missing"}


# (flags, exit status, what the job that ran says first); {name} is a path of `files`
CASES = [
    ("nothing: build asks for a dataset", "", 2, "pass --dataset and --data-root"),
    ("neighbours with a dataset: build", "--rerank-neighbours 5 --dataset cub --data-root {missing} " + " ".join(TINY),
     1, "missing"),
    ("neighbours alone: edit the index at --out", "--rerank-neighbours 5", 2,
     "--remove/--remove-path/--rerank-neighbours on an existing index need --out DIR"),
    ("remove wins over a dataset", "--remove id_1 --dataset cub --data-root {missing}", 2,
     "--remove/--remove-path/--rerank-neighbours on an existing index need --out DIR"),
    ("remove wins over add", "--remove-path a.jpg --add {images}", 2, "on an existing index need --out DIR"),
    ("add wins over from-embeddings", "--add {images} --from-embeddings {npy}", 2, "--add needs --out DIR"),
    ("add ignores the index settings", "--add {missing} --out {base}/idx --index-type lsh", 1,
     "image or folder not found"),
    ("from a vector file: index settings first", "--from-embeddings {npy} --dataset cub --index-type lsh", 1,
     "unknown index type 'lsh'"),
    ("from a vector file: vectors alone", "--from-embeddings {npy} --dataset cub", 2,
     "--from-embeddings builds from vectors alone"),
    ("from a vector file: a .npy", "--from-embeddings {txt} --out {base}/idx", 2, "expected an (N, D) float32 .npy"),
    ("from a vector file: --out", "--from-embeddings {npy}", 2, "--from-embeddings needs --out DIR"),
    ("from a folder: embedding parts", "--from-embeddings {dir} --out {base}/idx", 1, "not-parts"),
    ("from a folder: vectors alone", "--from-embeddings {dir} --untrained", 2,
     "--from-embeddings builds from vectors alone"),
]


@pytest.mark.parametrize("flags,status,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_flags_pick_one_job(files, flags, status, words) -> None:
    res = CliRunner().invoke(app, ["index", *flags.format(**files).split()])
    assert res.exit_code == status, res.output
    assert words in " ".join(res.output.split()), res.output

