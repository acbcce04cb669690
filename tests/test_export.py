"""ONNX export of a real (small) embedder: checker, metadata, dynamic/fixed batch, fp16, parity with torch,
identical rankings across backends, and the `retrieval export` command.

One resnet18 / 64 px / 32-d checkpoint is exported once per module and shared by the tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import typer
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from retrieval.checkpoint import embedder_from_checkpoint, save_checkpoint
from retrieval.config import DataConfig, ModelConfig, RunConfig
from retrieval.embed.spec import EmbedderSpec, open_embedder
from retrieval.embed.onnx_backend import CPU, OnnxBackend
from retrieval.export import (
    FP16_MIN_COSINE,
    FP32_MAX_ABS_DIFF,
    ExportResult,
    ParityError,
    check_parity,
    export_checkpoint,
    export_embedder,
    parity_images,
    torch_reference,
)
from retrieval.model import Embedder
from retrieval.preprocess import preprocess_eval

GALLERY_SIZE = 20


def draw_gallery(folder: Path, n: int = GALLERY_SIZE, seed: int = 0) -> list[Path]:
    """Photos-like test images: a coloured background with a few shapes, varied sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(70, 110)), int(rng.integers(70, 110))
        img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            box = (x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2)))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        paths.append(folder / f"img_{i:02d}.jpg")
        img.save(paths[-1], quality=95)
    return paths


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = Embedder(ModelConfig(arch="resnet18", embedding_size=32, pretrained="none"))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them into convs is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    cfg = RunConfig(
        data=DataConfig(dataset="folder", root=None, image_size=64, resize_size=72),
        model=ModelConfig(arch="resnet18", embedding_size=32, pretrained="none"),
    )
    ckpt = root / "run.pt"
    save_checkpoint(ckpt, model, cfg)
    gallery = draw_gallery(root / "gallery")
    result = export_checkpoint(ckpt, root / "model.onnx", parity_folder=root / "gallery", parity_count=6)
    return {"root": root, "ckpt": ckpt, "gallery": gallery, "result": result}


def test_export_is_one_checked_file_with_our_metadata(workspace: dict) -> None:
    result: ExportResult = workspace["result"]
    model, _cfg, prep, fingerprint = embedder_from_checkpoint(workspace["ckpt"])
    assert result.files == [result.path] and not Path(str(result.path) + ".data").exists()
    assert [p.name for p in result.path.parent.iterdir() if p.name.startswith(".model.onnx")] == []  # no staging left
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    assert all(init.data_location != onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["opset"] == "18" and proto.opset_import[0].version == 18
    backend = OnnxBackend(result.path, providers=[CPU])
    assert backend.fingerprint == fingerprint
    assert backend.preprocessing == prep
    assert (backend.embedding_size, backend.arch, backend.precision, backend.batch_size) == (32, "resnet18", "fp32", None)


def test_export_parity_was_checked_on_the_given_images(workspace: dict) -> None:
    report = workspace["result"].parity
    assert report is not None and report.passed
    assert report.num_images == 6 and "gallery" in report.source
    assert report.max_abs_diff <= FP32_MAX_ABS_DIFF and report.min_cosine > 0.9999


def test_dynamic_batch_runs_any_size_and_matches_torch(workspace: dict) -> None:
    model, _cfg, prep, _fp = embedder_from_checkpoint(workspace["ckpt"])
    backend = OnnxBackend(workspace["result"].path, providers=[CPU])
    batch = np.stack([preprocess_eval(Image.open(p).convert("RGB"), prep) for p in workspace["gallery"][:4]])
    for n in (1, 3):
        emb = backend.embed_array(batch[:n])
        assert emb.shape == (n, 32)
        np.testing.assert_allclose(emb, torch_reference(model, batch[:n]), atol=FP32_MAX_ABS_DIFF)


def test_rankings_are_identical_across_backends_and_indexes_are_interchangeable(workspace: dict) -> None:
    torch_backend = open_embedder(EmbedderSpec.checkpoint(workspace["ckpt"]), "cpu")
    onnx_backend = open_embedder(EmbedderSpec.onnx(workspace["result"].path), "cpu")
    assert torch_backend.fingerprint == onnx_backend.fingerprint  # an index records this; both accept it
    gallery = workspace["gallery"]
    g_torch = torch_backend.embed_paths(gallery, batch_size=8, progress=False)
    g_onnx = onnx_backend.embed_paths(gallery, batch_size=8, progress=False)
    np.testing.assert_allclose(g_onnx, g_torch, atol=FP32_MAX_ABS_DIFF)
    # queries: gallery photos as a user would re-take them (mirrored, cropped)
    queries = [Image.open(p).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in gallery[::4]]
    queries += [Image.open(p).convert("RGB").crop((5, 5, 60, 60)) for p in gallery[1::4]]
    q_torch, q_onnx = torch_backend.embed_images(queries), onnx_backend.embed_images(queries)
    k = 5

    def topk(q: np.ndarray, g: np.ndarray) -> np.ndarray:
        return np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :k]

    expected = topk(q_torch, g_torch)
    assert (topk(q_onnx, g_onnx) == expected).all()  # all-onnx deployment
    assert (topk(q_onnx, g_torch) == expected).all()  # torch-built index searched with onnx
    assert (topk(q_torch, g_onnx) == expected).all()  # onnx-built index searched with torch


def test_fp16_export_halves_the_file_and_keeps_cosine(workspace: dict) -> None:
    model, _cfg, prep, fp = embedder_from_checkpoint(workspace["ckpt"])
    batch, source = parity_images(prep, folder=workspace["root"] / "gallery", count=8)
    out = workspace["root"] / "model16.onnx"
    result = export_embedder(model, prep, out, fingerprint=fp, fp16=True, parity_batch=batch, parity_source=source)
    assert result.parity is not None and result.parity.passed and result.parity.min_cosine >= FP16_MIN_COSINE
    assert result.metadata["precision"] == "fp16"
    assert result.size_bytes < 0.6 * workspace["result"].size_bytes
    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 in
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 out
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in proto.graph.initializer)
    backend = OnnxBackend(out, providers=[CPU])
    assert backend.fingerprint == fp  # same checkpoint, same gallery compatibility


def test_fixed_batch_and_external_data_and_older_opset(workspace: dict) -> None:
    model, _cfg, prep, fp = embedder_from_checkpoint(workspace["ckpt"])
    out = workspace["root"] / "fixed" / "model.onnx"
    batch, source = parity_images(prep, count=5)  # 5 rows through a batch-2 graph: padding exercised
    assert "random tensors" in source
    result = export_embedder(
        model, prep, out, fingerprint=fp, opset=17, batch_size=2, external_data=True, parity_batch=batch, parity_source=source
    )
    assert result.parity is not None and result.parity.passed
    assert sorted(f.name for f in result.files) == ["model.onnx", "model.onnx.data"]
    assert out.stat().st_size < 100_000 < Path(str(out) + ".data").stat().st_size
    onnx.checker.check_model(str(out))
    backend = OnnxBackend(out, providers=[CPU])
    assert backend.batch_size == 2 and backend.metadata["opset"] == "17"
    assert onnx.load(str(out), load_external_data=False).opset_import[0].version == 17


def test_parity_failure_writes_nothing_and_says_why(workspace: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _cfg, prep, fp = embedder_from_checkpoint(workspace["ckpt"])
    batch, source = parity_images(prep, count=3)
    import retrieval.export as export_module

    real = export_module.torch_reference
    monkeypatch.setattr(export_module, "torch_reference", lambda m, b: real(m, b) + 1e-3)  # a torch/ORT mismatch
    out = workspace["root"] / "bad.onnx"
    with pytest.raises(ParityError, match=r"FAILED.*max abs diff.*not written"):
        export_embedder(model, prep, out, fingerprint=fp, opset=17, parity_batch=batch, parity_source=source)
    assert not out.exists()
    assert not [p for p in workspace["root"].iterdir() if p.name.startswith(".bad.onnx")]


def test_parity_detects_a_different_model(workspace: dict) -> None:
    _model, _cfg, prep, _fp = embedder_from_checkpoint(workspace["ckpt"])
    other = Embedder(ModelConfig(arch="resnet18", embedding_size=32, pretrained="none")).eval()
    batch, source = parity_images(prep, count=2)
    report = check_parity(other, OnnxBackend(workspace["result"].path, providers=[CPU]), batch, source)
    assert not report.passed and "FAILED" in report.summary()


def _cli() -> typer.Typer:
    from retrieval.cli import export as export_cli
    from retrieval.cli import handle_errors

    app = typer.Typer()
    export_cli.register(app)
    app.command("noop", hidden=True)(lambda: None)  # keep `export` a named sub-command
    return handle_errors(app)


def test_cli_export_prints_parity_numbers(workspace: dict) -> None:
    out = workspace["root"] / "cli" / "model.onnx"
    args = ["export", "--checkpoint", str(workspace["ckpt"]), "--out", str(out), "--opset", "17",
            "--parity-images", str(workspace["root"] / "gallery"), "--parity-count", "3"]  # fmt: skip
    res = CliRunner().invoke(_cli(), args)
    assert res.exit_code == 0, res.output
    assert "parity passed" in res.output and "max abs diff" in res.output and "min cosine" in res.output
    assert out.is_file() and OnnxBackend(out, providers=[CPU]).fingerprint == workspace["result"].metadata["fingerprint"]


def test_cli_export_fails_clearly_without_a_checkpoint(tmp_path: Path) -> None:
    res = CliRunner().invoke(_cli(), ["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 1
    assert "checkpoint not found" in res.output and not (tmp_path / "m.onnx").exists()


# --- deployment without torch: the real search and serve paths --------------------------------
# A torch-built index of a fake In-Shop dataset, searched with the ONNX export of the same checkpoint
# in a fresh interpreter; afterwards neither torch nor torchvision may have been imported.
REPO = Path(__file__).resolve().parents[1]
TORCH_FREE_EPILOGUE = (
    "\nheavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
    "assert not heavy, f'imported {heavy[:5]}'\n"
)


@pytest.fixture(scope="module")
def torch_built_index(workspace: dict) -> dict:
    from retrieval.index.build import build_index
    from retrieval.index.config import IndexConfig
    from retrieval.data import load_dataset
    from tests.fakes import make_fake_inshop

    data_root = make_fake_inshop(workspace["root"] / "inshop", train_items=1, test_items=4, per_item=2, size=48)
    dataset = load_dataset("inshop", data_root)
    backend = open_embedder(EmbedderSpec.checkpoint(workspace["ckpt"]), "cpu")
    index_dir = workspace["root"] / "inshop-index"
    build_index(dataset, backend, index_dir, IndexConfig(use_gpu=False), progress=False)
    query = Path(dataset.query.paths[0])
    g = backend.embed_paths(list(dataset.gallery.paths), progress=False)
    q = backend.embed_paths([query], progress=False)
    expected = np.argsort(-(q @ g.T)[0], kind="stable").tolist()  # torch ranking of the whole gallery
    return {"index": index_dir, "query": query, "expected": expected, "gallery": [str(p) for p in dataset.gallery.paths],
            "data_root": data_root}


def run_torch_free(code: str) -> str:
    """Run `code` in a fresh interpreter, then assert torch / torchvision were never imported; returns stdout."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", "import sys\n" + code + TORCH_FREE_EPILOGUE],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cli_search_with_onnx_never_imports_torch(workspace: dict, torch_built_index: dict) -> None:
    import json

    k = len(torch_built_index["gallery"])
    argv = ["search", str(torch_built_index["query"]), "--index", str(torch_built_index["index"]), "-k", str(k),
            "--backend", "onnx", "--model", str(workspace["result"].path), "--device", "cpu", "--json"]
    out = run_torch_free(
        "from retrieval.cli import app\n"
        f"code = app({argv!r}, standalone_mode=False)\n"
        "assert code in (None, 0), code\n"
    )
    payload = json.loads(out)
    hits = payload["results"][0]["hits"]
    assert payload["devices"]["embedding"].startswith("onnxruntime")
    assert [h["gallery_index"] for h in hits] == torch_built_index["expected"]  # same ranking as torch
    gallery, root = torch_built_index["gallery"], torch_built_index["data_root"]
    assert [h["path"] for h in hits] == [Path(gallery[i]).relative_to(root).as_posix()  # as the search API names them
                                         for i in torch_built_index["expected"]]


def test_app_with_onnx_never_imports_torch(workspace: dict, torch_built_index: dict) -> None:
    out = run_torch_free(
        "from retrieval.embed.spec import EmbedderSpec\n"
        "from retrieval.search.searcher import Searcher\n"
        "from app.ui import build_app\n"
        f"searcher = Searcher.open({str(torch_built_index['index'])!r}, EmbedderSpec.onnx("
        f"{str(workspace['result'].path)!r}), device='cpu')\n"
        "demo, search_app = build_app(searcher)\n"
        f"galleries, statuses = search_app.search_batch([{str(torch_built_index['query'])!r}], [3])\n"
        "search_app.thumbnails.cleanup()\n"
        "assert len(galleries[0]) == 3, statuses\n"
        "print(search_app.backend.name)\n"
        "print([h.gallery_index for h in searcher.search_paths("
        f"[{str(torch_built_index['query'])!r}], k=3)[0]])\n"
    )
    name, ranking = out.strip().splitlines()[-2:]
    assert name == "onnx" and ranking == str(torch_built_index["expected"][:3])
