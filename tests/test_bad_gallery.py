"""Index builds skip gallery images that cannot be used (listing them all), fail only above
--max-bad-fraction, and --strict keeps stopping at the first; what killed writers leave beside an
index or a run folder is removed by the next build or run, and a write in progress is left alone."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retrieval.atomic import atomic_path, clean_stale_leftovers
from retrieval.index.build import build_index
from retrieval.embed.spec import EmbedderSpec, open_embedder
from retrieval.cli import app
from retrieval.index.config import IndexConfig
from retrieval.data import load_dataset
from retrieval.errors import InputError
from retrieval.images import ImageLoadError
from retrieval.index.folder import GalleryIndex
from tests.fakes import make_fake_inshop

TINY = dict(arch="resnet18", embedding_size=16, image_size=32, seed=0)
FLAGS = ["--untrained", "--arch", "resnet18", "--embedding-size", "16", "--image-size", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def backend():
    return open_embedder(EmbedderSpec.untrained(**TINY), "cpu")


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """In-Shop layout, 8 gallery images of which one is truncated (fails while decoding) and one is text."""
    root = make_fake_inshop(tmp_path_factory.mktemp("inshop"), train_items=1, test_items=4, per_item=4)
    gallery = load_dataset("inshop", root).gallery
    truncated, text = Path(gallery.paths[1]), Path(gallery.paths[4])
    truncated.write_bytes(truncated.read_bytes()[:200])
    text.write_bytes(b"not a photo\n")
    return root, [truncated, text]


def test_bad_gallery_images_are_skipped_and_listed(broken, backend, tmp_path: Path) -> None:
    root, bad = broken
    emb_backend = backend
    out = tmp_path / "idx"
    built = build_index(load_dataset("inshop", root), emb_backend, out, IndexConfig(use_gpu=False),
                        progress=False, max_bad_fraction=0.5)
    gallery = load_dataset("inshop", root).gallery
    good = [p for p in gallery.paths if Path(p) not in bad]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_items"] == len(good) == len(gallery) - 2 and meta["n_bad_images"] == 2
    assert sorted(Path(b["path"]).name for b in meta["bad_images"]) == sorted(p.name for p in bad)
    assert all(b["path"] in b["reason"] or Path(b["path"]).name in b["reason"] for b in meta["bad_images"])
    # the kept items are exactly the good images, in order, with their own embeddings and labels
    reopened = GalleryIndex.load(out)
    assert [Path(p).name for p in reopened.items.paths] == [Path(p).name for p in good]
    expected = emb_backend.embed_paths(good, progress=False)
    np.testing.assert_allclose(reopened.exact_gallery_vectors(), expected, atol=1e-5)
    labels = [gallery.labels[i] for i, p in enumerate(gallery.paths) if Path(p) not in bad]
    assert reopened.items.labels == labels and len(built) == len(good)


def test_too_many_bad_images_fail_naming_them_and_write_nothing(broken, backend, tmp_path: Path) -> None:
    root, bad = broken
    emb_backend = backend
    with pytest.raises(InputError) as info:
        build_index(load_dataset("inshop", root), emb_backend, tmp_path / "idx", IndexConfig(use_gpu=False),
                    progress=False, max_bad_fraction=0.1)
    assert "2 of 8" in str(info.value) and all(p.name in str(info.value) for p in bad)
    assert not (tmp_path / "idx").exists()


def test_strict_stops_at_the_first_bad_image(broken, backend, tmp_path: Path) -> None:
    root, bad = broken
    emb_backend = backend
    with pytest.raises(ImageLoadError, match=bad[0].name):
        build_index(load_dataset("inshop", root), emb_backend, tmp_path / "idx", IndexConfig(use_gpu=False),
                    progress=False, strict=True)


def test_cli_counts_the_skipped_images_and_fails_above_the_threshold(broken, tmp_path: Path) -> None:
    root, bad = broken
    runner = CliRunner()
    args = ["index", "--dataset", "inshop", "--data-root", str(root), *FLAGS]
    ok = runner.invoke(app, args + ["--out", str(tmp_path / "a"), "--max-bad-fraction", "0.5"])
    assert ok.exit_code == 0, ok.output
    assert "skipped 2 image(s)" in ok.stderr and all(p.name in ok.stderr for p in bad)
    refused = runner.invoke(app, args + ["--out", str(tmp_path / "b")])
    assert refused.exit_code == 1
    assert refused.stderr.startswith("error: 2 of 8 gallery images cannot be used")


# --- leftovers of killed writers --------------------------------------------------------------------

_SLOW_PUBLISH = """
import sys, time
from pathlib import Path
from retrieval.index.folder import publish_folder
def write(tmp: Path) -> None:
    (tmp / "index.faiss").write_bytes(b"x" * 1000)
    print("writing", flush=True)
    time.sleep(60)
publish_folder(Path(sys.argv[1]), write)
"""


def _start_slow_publish(target: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_PUBLISH, str(target)], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_a_killed_build_leaves_a_folder_the_next_build_removes_and_reports(
    backend, broken, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "idx"
    proc = _start_slow_publish(target)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = list(tmp_path.glob(".idx.building-*"))
    assert len(leftovers) == 1
    os.utime(leftovers[0], (time.time() - 60, time.time() - 60))
    root, _ = broken
    emb_backend = backend
    with caplog.at_level(logging.WARNING, logger="retrieval.atomic"):
        build_index(load_dataset("inshop", root), emb_backend, target, IndexConfig(use_gpu=False),
                    progress=False, max_bad_fraction=0.5)
    assert not list(tmp_path.glob(".idx.*")) and GalleryIndex.load(target)
    assert any("removed" in r.message and ".idx.building-" in r.message for r in caplog.records)


def test_a_build_in_progress_is_not_taken_for_a_leftover(tmp_path: Path) -> None:
    target = tmp_path / "idx"
    proc = _start_slow_publish(target)
    try:
        building = list(tmp_path.glob(".idx.building-*"))
        assert len(building) == 1
        assert clean_stale_leftovers(tmp_path, ["idx"], grace_s=0) == [] and building[0].is_dir()
    finally:
        proc.kill()
        proc.wait()
    assert clean_stale_leftovers(tmp_path, ["idx"], grace_s=0) == building  # its writer is gone now


def test_temporary_files_are_removed_only_once_their_writer_is_gone(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"half a checkpoint")
        assert clean_stale_leftovers(tmp_path, ["last.pt"], grace_s=0) == [] and tmp.exists()
    orphan = tmp_path / ".last.pt.k1ll3d.tmp"  # as a kill -9 during torch.save leaves it
    orphan.write_bytes(b"x" * 1000)
    assert clean_stale_leftovers(tmp_path, ["last.pt"], grace_s=60) == []  # too young to judge
    assert clean_stale_leftovers(tmp_path, ["last.pt"], grace_s=0) == [orphan] and not orphan.exists()
    assert target.read_bytes() == b"half a checkpoint"
