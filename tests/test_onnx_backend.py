"""The onnxruntime backend on its own: loading, clear errors, providers, batching, and that it never needs torch.

Models here are tiny hand-built ONNX graphs (global average pool -> MatMul -> L2 norm) carrying the
same metadata `retrieval export` writes, so these tests run in well under a second each and in a
process without torch. Parity with real exported embedders lives in test_export.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from retrieval.embed.backend import EmbeddingBackend
from retrieval.embed.spec import EmbedderSpec, open_embedder
from retrieval.embed.onnx_backend import (
    CPU,
    CUDA,
    ONNX_FORMAT,
    OnnxBackend,
    OnnxModelError,
    build_metadata,
    default_providers,
    nvidia_gpu_visible,
    physical_cores,
    providers_for_device,
)
from retrieval.preprocess import Preprocessing, preprocess_eval

SIZE, DIM = 32, 8
PREP = Preprocessing(image_size=SIZE, resize_size=36, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
REPO = Path(__file__).resolve().parents[1]


def tiny_embedder_onnx(
    path: Path, *, batch: int | None = None, metadata: dict[str, str] | None = None, size: int = SIZE
) -> np.ndarray:
    """images (B, 3, S, S) -> GlobalAveragePool -> (B, 3) @ W (3, DIM) -> L2 normalise. Returns W."""
    w = np.random.default_rng(0).standard_normal((3, DIM)).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["images"], ["pooled4d"]),
        helper.make_node("Flatten", ["pooled4d"], ["pooled"], axis=1),
        helper.make_node("MatMul", ["pooled", "W"], ["raw"]),
        helper.make_node("LpNormalization", ["raw"], ["embeddings"], axis=1, p=2),
    ]
    b = batch if batch is not None else "batch"
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [b, 3, size, size])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [b, DIM])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    if metadata is None:
        metadata = build_metadata(
            fingerprint="feedc0de12345678",
            embedding_size=DIM,
            preprocessing=PREP,
            arch="tiny",
            opset=18,
            precision="fp32",
            batch_size=batch,
        )
    for k, v in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w


def reference(images: list[Image.Image], w: np.ndarray) -> np.ndarray:
    """What the tiny graph computes, in NumPy."""
    x = np.stack([preprocess_eval(im, PREP) for im in images]).mean(axis=(2, 3)) @ w
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def photos(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (int(rng.integers(30, 60)), int(rng.integers(30, 60)), 3), np.uint8))
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    return path, tiny_embedder_onnx(path)


def test_backend_reads_metadata_and_implements_the_interface(tiny: tuple[Path, np.ndarray]) -> None:
    path, _ = tiny
    backend = OnnxBackend(path, providers=[CPU])
    assert isinstance(backend, EmbeddingBackend)
    assert (backend.name, backend.fingerprint, backend.embedding_size) == ("onnx", "feedc0de12345678", DIM)
    assert backend.preprocessing == PREP
    assert backend.batch_size is None
    assert backend.device == "onnxruntime CPUExecutionProvider"
    assert backend.session.get_session_options().intra_op_num_threads == physical_cores()


def test_embeddings_match_numpy_and_are_normalised(tiny: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, w = tiny
    backend = OnnxBackend(path, providers=[CPU])
    images = photos(5)
    emb = backend.embed_images(images)
    assert emb.dtype == np.float32 and emb.shape == (5, DIM)
    np.testing.assert_allclose(emb, reference(images, w), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    files = []
    for i, im in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        im.save(files[-1])
    for workers in (0, 2):  # sequential and prefetching decode give the same rows in the same order
        backend.workers = workers
        np.testing.assert_allclose(backend.embed_paths(files, batch_size=2, progress=False), emb, atol=1e-6)
    assert backend.embed_images([]).shape == (0, DIM)
    assert backend.embed_paths([], progress=False).shape == (0, DIM)


def test_fixed_batch_model_is_fed_in_padded_chunks(tmp_path: Path) -> None:
    fixed, dynamic = tmp_path / "fixed.onnx", tmp_path / "dynamic.onnx"
    w = tiny_embedder_onnx(fixed, batch=2)
    tiny_embedder_onnx(dynamic)
    backend = OnnxBackend(fixed, providers=[CPU])
    assert backend.batch_size == 2
    images = photos(3, seed=1)
    emb = backend.embed_images(images)  # 3 images through a batch-2 graph: one full chunk + one padded
    np.testing.assert_allclose(emb, OnnxBackend(dynamic, providers=[CPU]).embed_images(images), atol=1e-6)
    np.testing.assert_allclose(emb, reference(images, w), atol=1e-5)


def test_missing_model_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(OnnxModelError, match=r"not found: .*nope\.onnx.*retrieval export"):
        OnnxBackend(tmp_path / "nope.onnx")
    with pytest.raises(OnnxModelError, match="folder"):
        OnnxBackend(tmp_path)


def test_non_onnx_file_is_refused_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is a checkpoint, not an ONNX graph" * 10)
    with pytest.raises(OnnxModelError, match=r"cannot load .*model\.onnx as an ONNX model"):
        OnnxBackend(bad, providers=[CPU])


def test_onnx_file_without_our_metadata_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.onnx"
    tiny_embedder_onnx(plain, metadata={})
    with pytest.raises(OnnxModelError, match="not an exported metrix-retrieval embedder"):
        OnnxBackend(plain, providers=[CPU])
    partial = tmp_path / "partial.onnx"
    tiny_embedder_onnx(partial, metadata={"format": ONNX_FORMAT, "fingerprint": "x"})
    with pytest.raises(OnnxModelError, match="lacks"):
        OnnxBackend(partial, providers=[CPU])


def test_input_shape_must_agree_with_the_recorded_image_size(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.onnx"
    tiny_embedder_onnx(wrong, size=SIZE * 2)  # metadata still says SIZE
    with pytest.raises(OnnxModelError, match="input shape"):
        OnnxBackend(wrong, providers=[CPU])


def test_provider_choice_and_reporting(tiny: tuple[Path, np.ndarray]) -> None:
    path, _ = tiny
    assert providers_for_device("cpu") == [CPU]
    assert providers_for_device("cuda:1") == [(CUDA, {"device_id": 1}), CPU]
    assert providers_for_device("auto") is None
    with pytest.raises(ValueError, match="unknown device"):
        providers_for_device("tpu")
    with pytest.raises(ValueError, match="unknown onnxruntime provider"):
        OnnxBackend(path, providers=["NoSuchExecutionProvider"])
    if not nvidia_gpu_visible():
        assert default_providers() == [CPU]  # never ask for CUDA without a GPU: it only logs load errors
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backend = OnnxBackend(path, providers=[CUDA, CPU])  # explicit request: falls back, and says so
        assert backend.device == "onnxruntime CPUExecutionProvider"
        assert any("could not use CUDAExecutionProvider" in str(w.message) for w in caught)
    else:
        assert default_providers()[0] == CUDA


def test_embedder_spec_picks_and_validates(tiny: tuple[Path, np.ndarray]) -> None:
    path, _ = tiny
    spec = EmbedderSpec.from_options("onnx", None, path)
    backend = open_embedder(spec, device="cpu")
    assert isinstance(backend, OnnxBackend) and backend.provider == CPU and backend.spec == spec
    assert spec.to_record() == {"kind": "onnx", "path": str(path.resolve())}
    assert EmbedderSpec.from_record(spec.to_record()) == spec  # what an index records re-opens the same embedder
    assert isinstance(open_embedder(EmbedderSpec.from_options("auto", None, path), device="cpu"), OnnxBackend)
    assert EmbedderSpec.from_options("auto", None, None) is None  # nothing named: the caller decides
    with pytest.raises(ValueError, match="needs --model"):
        EmbedderSpec.from_options("onnx", "run.pt", None)
    with pytest.raises(ValueError, match="unknown backend"):
        EmbedderSpec.from_options("tensorrt", None, path)
    with pytest.raises(ValueError, match="needs --checkpoint"):
        EmbedderSpec.from_options("torch", None, None)
    with pytest.raises(ValueError, match="built from vectors"):
        EmbedderSpec.from_record({"kind": "vectors", "path": "x.npy"})


# --- deployment without torch ----------------------------------------------------------------
# Each snippet runs in a fresh interpreter with MODEL (an exported-style ONNX file) and IMAGES (a
# folder of PNGs) defined; afterwards neither torch nor torchvision may have been imported.
# The real `retrieval search --backend onnx` and app paths (a torch-built index searched with an
# exported model) are checked the same way in test_export.py.
TORCH_FREE_SNIPPETS = [
    pytest.param(
        """
        import retrieval.embed.backend, retrieval.embed.onnx_backend, retrieval.embed.spec, retrieval.images
        import retrieval.preprocess, retrieval.search.searcher, retrieval.cli.embedder_options
        """,
        id="import-backend-modules",
    ),
    pytest.param(
        """
        from PIL import Image
        from retrieval.embed.spec import EmbedderSpec, open_embedder
        backend = open_embedder(EmbedderSpec.onnx(MODEL))
        paths = sorted(IMAGES.glob("*.png"))
        a = backend.embed_paths(paths, batch_size=2, progress=False)
        b = backend.embed_images([Image.open(p) for p in paths])
        assert a.shape == (len(paths), backend.embedding_size) and abs(a - b).max() < 1e-5
        print(backend.device)
        """,
        id="load-backend-and-embed",
    ),
]


@pytest.mark.parametrize("snippet", TORCH_FREE_SNIPPETS)
def test_onnx_path_never_imports_torch(snippet: str, tiny: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = tiny
    for i, im in enumerate(photos(3)):
        im.save(tmp_path / f"{i}.png")
    prologue = f"import sys\nfrom pathlib import Path\nMODEL = Path({str(path)!r})\nIMAGES = Path({str(tmp_path)!r})\n"
    epilogue = (
        "\nheavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "assert not heavy, f'imported {heavy[:5]}'\n"
    )
    code = prologue + textwrap.dedent(snippet) + epilogue
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_metadata_is_plain_strings_that_round_trip() -> None:
    meta = build_metadata(
        fingerprint="abc", embedding_size=512, preprocessing=PREP, arch="resnet50", opset=18, precision="fp16", batch_size=4
    )
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["mean"]) == list(PREP.mean) and meta["batch_size"] == "4"
