"""The onnxruntime embedding backend: an exported embedder (`retrieval export`) without torch.

Only onnxruntime, NumPy and Pillow are imported, so a search/serve deployment needs no torch.
The ONNX file carries the facts an index depends on (fingerprint of the checkpoint, embedding
size, preprocessing) in its metadata, so a gallery indexed with the torch backend of a checkpoint
is searchable with the ONNX export of the same checkpoint, and vice versa.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from retrieval.errors import UsageError, UserError
from retrieval.images import open_image
from retrieval.preprocess import Preprocessing, preprocess_batch, preprocess_eval

ONNX_FORMAT = "metrix-retrieval/onnx/1"
INPUT_NAME = "images"  # (B, 3, S, S) float32, normalised
OUTPUT_NAME = "embeddings"  # (B, D) float32, L2-normalised
REQUIRED_METADATA = ("format", "fingerprint", "embedding_size", "image_size", "resize_size", "mean", "std")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class OnnxModelError(UserError, ValueError):
    """An ONNX model is missing, unreadable, or not an exported embedder; the message names the file."""


def build_metadata(
    *,
    fingerprint: str,
    embedding_size: int,
    preprocessing: Preprocessing,
    arch: str,
    opset: int,
    precision: str,
    batch_size: int | None,
) -> dict[str, str]:
    """The metadata_props written into an exported model (ONNX stores string -> string)."""
    return {
        "format": ONNX_FORMAT,
        "fingerprint": fingerprint,
        "embedding_size": str(int(embedding_size)),
        "image_size": str(int(preprocessing.image_size)),
        "resize_size": str(int(preprocessing.resize_size)),
        "mean": json.dumps([float(v) for v in preprocessing.mean]),
        "std": json.dumps([float(v) for v in preprocessing.std]),
        "arch": arch,
        "opset": str(int(opset)),
        "precision": precision,
        "batch_size": "dynamic" if batch_size is None else str(int(batch_size)),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
    }


def parse_metadata(meta: dict[str, str], path: str | os.PathLike[str]) -> tuple[Preprocessing, int, str]:
    """(preprocessing, embedding_size, fingerprint) from an exported model's metadata, or OnnxModelError."""
    if meta.get("format") != ONNX_FORMAT:
        found = f"format {meta['format']!r}" if "format" in meta else "no metrix-retrieval metadata"
        raise OnnxModelError(
            f"{path} is an ONNX model but not an exported metrix-retrieval embedder ({found}; "
            f"expected format {ONNX_FORMAT!r}). Export one with `retrieval export --checkpoint CKPT --out {path}`."
        )
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise OnnxModelError(f"{path}: ONNX metadata lacks {missing}; re-export it with `retrieval export`.")
    try:
        prep = Preprocessing.from_dict(
            {
                "image_size": meta["image_size"],
                "resize_size": meta["resize_size"],
                "mean": json.loads(meta["mean"]),
                "std": json.loads(meta["std"]),
            }
        )
        return prep, int(meta["embedding_size"]), meta["fingerprint"]
    except (ValueError, TypeError, KeyError) as exc:
        raise OnnxModelError(
            f"{path}: unreadable ONNX metadata ({exc}); re-export it with `retrieval export`."
        ) from exc


def nvidia_gpu_visible() -> bool:
    """Cheap check (no CUDA initialisation) for an NVIDIA GPU: asking onnxruntime for CUDA without one
    only produces load errors on stderr before it falls back to CPU."""
    if Path("/dev/nvidia0").exists() or Path("/dev/dxg").exists():
        return True
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def physical_cores() -> int:
    """Physical cores usable by this process (onnxruntime runs best with one intra-op thread per core)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        cores: set[tuple[str, str]] = set()
        phys = core = ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "physical id":
                phys = value
            elif key == "core id":
                core = value
            elif not key and core:
                cores.add((phys, core))
                phys = core = ""
        if core:
            cores.add((phys, core))
        if cores:
            return max(1, min(logical, len(cores)))
    except OSError:
        pass
    return max(1, logical)


def default_providers() -> list[str]:
    """CUDA first when onnxruntime-gpu has it and a GPU is visible, CPU always as the fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if CUDA in available and nvidia_gpu_visible():
        return [CUDA, CPU]
    return [CPU]


def providers_for_device(device: str) -> list[Any] | None:
    """Map a torch-style device string ("cpu", "cuda", "cuda:1", "auto") to onnxruntime providers."""
    device = device.strip().lower()
    if device in ("", "auto"):
        return None
    if device == "cpu":
        return [CPU]
    if device.startswith("cuda"):
        _, _, index = device.partition(":")
        return [(CUDA, {"device_id": int(index or 0)}), CPU]
    raise UsageError(f"unknown device {device!r} for the onnx backend; use auto, cpu, cuda or cuda:N")


def _provider_name(p: Any) -> str:
    return p[0] if isinstance(p, (tuple, list)) else str(p)


def session_options(threads: int | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or physical_cores()
    so.inter_op_num_threads = 1
    return so


class OnnxBackend:
    """EmbeddingBackend over an exported ONNX embedder run by onnxruntime.

    `device` reports the provider onnxruntime actually uses (it silently falls back to CPU when the
    CUDA libraries are missing), e.g. "onnxruntime CPUExecutionProvider".
    """

    name = "onnx"
    spec = None  # set by retrieval.embed.spec.open_embedder

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        providers: Sequence[Any] | None = None,
        threads: int | None = None,
        workers: int = 2,
    ) -> None:
        path = Path(model_path)
        if not path.is_file():
            hint = " (it is a folder)" if path.is_dir() else ""
            raise OnnxModelError(
                f"ONNX model not found: {path}{hint}. Create one with `retrieval export --checkpoint CKPT --out "
                f"{path}`."
            )
        import onnxruntime as ort

        requested = list(providers) if providers else default_providers()
        names = [_provider_name(p) for p in requested]
        unknown = [n for n in names if n not in ort.get_all_providers()]
        if unknown:
            raise UsageError(f"unknown onnxruntime provider(s) {unknown}; known: {ort.get_all_providers()}")
        if CUDA in names and nvidia_gpu_visible():
            try:  # CUDA/cuDNN from the nvidia-* wheels, when torch has not loaded them already
                ort.preload_dlls(directory="")
            except Exception:
                pass
        try:
            self.session = ort.InferenceSession(str(path), sess_options=session_options(threads), providers=requested)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            raise OnnxModelError(
                f"cannot load {path} as an ONNX model ({type(exc).__name__}: {str(exc).strip()[:300]}). "
                "It may be truncated or not an ONNX file; re-export it with `retrieval export`."
            ) from exc
        self.model_path = path
        self.requested_providers = names
        self.providers: list[str] = list(self.session.get_providers())
        self.provider = self.providers[0]
        self.device = f"onnxruntime {self.provider}"
        if names[0] != self.provider:
            warnings.warn(
                f"onnxruntime could not use {names[0]} for {path} (missing GPU or CUDA/cuDNN libraries); "
                f"running on {self.provider}.",
                RuntimeWarning,
                stacklevel=2,
            )
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.preprocessing, self.embedding_size, self.fingerprint = parse_metadata(self.metadata, path)
        self.arch = self.metadata.get("arch", "")
        self.precision = self.metadata.get("precision", "fp32")
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        shape = inputs[0].shape  # [batch, 3, S, S]; batch is a str when dynamic
        s = self.preprocessing.image_size
        if len(shape) != 4 or list(shape[1:]) != [3, s, s]:
            raise OnnxModelError(f"{path}: input shape {shape} does not match the metadata's {s} px images")
        self.batch_size: int | None = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.workers = max(0, int(workers))

    def runtime_versions(self) -> dict[str, str]:
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__}

    def __repr__(self) -> str:
        return f"OnnxBackend({str(self.model_path)!r}, device={self.device!r}, fingerprint={self.fingerprint!r})"

    def embed_array(self, batch: np.ndarray) -> np.ndarray:
        """batch (N, 3, S, S) float32 normalised -> emb (N, D) float32, L2-normalised.

        A model exported with a fixed batch size is fed in chunks of that size (last one zero-padded).
        """
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        n = batch.shape[0]
        if n == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        step = self.batch_size or n
        out = []
        for start in range(0, n, step):
            chunk = batch[start : start + step]
            real = chunk.shape[0]
            if self.batch_size and real < self.batch_size:
                pad = np.zeros((self.batch_size - real, *chunk.shape[1:]), np.float32)
                chunk = np.concatenate([chunk, pad], axis=0)
            out.append(self.session.run([self.output_name], {self.input_name: chunk})[0][:real])
        emb = np.concatenate(out, axis=0).astype(np.float32, copy=False)
        # Re-normalise in fp32: an fp16 export normalises in fp16 precision.
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return emb / np.maximum(norms, 1e-12)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.embedding_size), np.float32)
        batch = preprocess_batch(images, self.preprocessing)
        return self.embed_array(batch)

    def _batches(self, paths: list[str | os.PathLike[str]], batch_size: int) -> Iterator[np.ndarray]:
        """Decoded, preprocessed batches; decoding of the next batch overlaps inference of this one."""

        def load(p: str | os.PathLike[str]) -> np.ndarray:
            return preprocess_eval(open_image(p), self.preprocessing)

        chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
        if self.workers == 0:
            for chunk in chunks:
                yield np.stack([load(p) for p in chunk])
            return
        with ThreadPoolExecutor(max_workers=self.workers) as pool:

            def load_chunk(chunk: Sequence[str | os.PathLike[str]]) -> np.ndarray:
                return np.stack([load(p) for p in chunk])

            pending: list[Future[np.ndarray] | None] = [pool.submit(load_chunk, c) for c in chunks[:2]]
            for i in range(len(chunks)):
                future = pending[i]
                assert future is not None
                batch = future.result()
                if i + 2 < len(chunks):
                    pending.append(pool.submit(load_chunk, chunks[i + 2]))
                pending[i] = None  # free the batch once consumed
                yield batch

    def embed_paths(
        self, paths: Sequence[str | os.PathLike[str]], batch_size: int = 64, progress: bool = True
    ) -> np.ndarray:
        paths = list(paths)
        if not paths:
            return np.zeros((0, self.embedding_size), np.float32)
        from tqdm.auto import tqdm

        out = []
        with tqdm(total=len(paths), desc="embedding", unit="img", disable=not progress) as bar:
            for batch in self._batches(paths, batch_size):
                out.append(self.embed_array(batch))
                bar.update(len(batch))
        return np.concatenate(out, axis=0)
