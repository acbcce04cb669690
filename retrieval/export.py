"""ONNX export of a trained embedder, and the parity check that proves the export computes the same thing.

The exported graph is the whole Embedder (trunk -> avg+max pool -> Linear -> L2 norm) with input
`images` (B, 3, S, S) float32 normalised and output `embeddings` (B, D) float32 L2-normalised,
a dynamic batch axis unless a fixed batch size is asked for, and the checkpoint's fingerprint and
preprocessing in metadata_props so `OnnxBackend` can serve it against indexes built with torch.

The file is written next to its destination in a temporary folder and only moved into place after
`onnx.checker` and the parity check pass, so a failed export never leaves a broken model behind.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from retrieval.atomic import fsync_file
from retrieval.embed.onnx_backend import CPU, INPUT_NAME, OUTPUT_NAME, OnnxBackend, build_metadata
from retrieval.errors import UsageError, UserError
from retrieval.image_files import image_files
from retrieval.images import ImageLoadError, open_image
from retrieval.model import Embedder
from retrieval.preprocess import Preprocessing, preprocess_eval

DEFAULT_OPSET = 18
DYNAMO_MIN_OPSET = 18  # lower opsets go through the TorchScript exporter
FP32_MAX_ABS_DIFF = 1e-4  # onnxruntime vs torch, fp32 export, on L2-normalised embeddings
FP16_MIN_COSINE = 0.999  # fp16 export: per-image cosine similarity to the fp32 torch embedding


class ExportError(UserError, RuntimeError):
    """The export could not be produced or verified; the message says what failed."""


class ParityError(ExportError):
    """onnxruntime's embeddings differ from torch's beyond tolerance."""


class _ExportGraph(nn.Module):
    """What goes into the ONNX file: images (B, 3, S, S) fp32 -> emb (B, D) fp32, L2-normalised.

    fp16: trunk, pooling and projection run in half precision (weights stored in fp16, half the
    file); inputs and outputs stay fp32 and the L2 normalisation runs in fp32, where the sum of
    squares cannot overflow.
    """

    def __init__(self, model: Embedder, fp16: bool) -> None:
        super().__init__()
        self.fp16 = fp16
        self.model = copy.deepcopy(model).cpu().eval()
        if fp16:
            self.model.half()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.fp16:
            return self.model(images)
        pooled = self.model.pool(self.model.trunk(images.half()))
        return F.normalize(self.model.embedding(pooled).float(), dim=1)


def _opset_of(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)


def _export_dynamo(
    graph: nn.Module,
    example: torch.Tensor,
    path: Path,
    metadata: dict[str, str],
    opset: int,
    batch_size: int | None,
    external_data: bool,
) -> None:
    """torch.export-based exporter (torch's default); writes one file unless external_data (or > 2 GB)."""
    program = torch.onnx.export(
        graph,
        (example,),
        None,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamo=True,
        dynamic_shapes=None if batch_size else ({0: torch.export.Dim("batch")},),
        external_data=external_data,
        verbose=False,
    )
    assert program is not None
    program.model.metadata_props.update(metadata)
    program.model.producer_name = "metrix-retrieval"
    program.save(str(path), external_data=external_data)


def _export_torchscript(
    graph: nn.Module,
    example: torch.Tensor,
    path: Path,
    metadata: dict[str, str],
    opset: int,
    batch_size: int | None,
    external_data: bool,
) -> None:
    """TorchScript exporter, for opsets below what the dynamo exporter emits (older runtimes)."""
    import onnx

    dynamic = None if batch_size else {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    torch.onnx.export(
        graph,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamo=False,
        dynamic_axes=dynamic,
        do_constant_folding=True,
    )
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "metrix-retrieval"
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=external_data,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
    )


def write_onnx(
    model: Embedder,
    preprocessing: Preprocessing,
    path: str | os.PathLike[str],
    *,
    fingerprint: str,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    batch_size: int | None = None,
    external_data: bool = False,
) -> dict[str, str]:
    """Export `model` to `path` (plus `path`.data when external_data) and run onnx.checker; returns the metadata.

    Not atomic on its own: `export_embedder` calls it inside a staging folder.
    """
    import onnx

    path = Path(path)
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    size = preprocessing.image_size
    graph = _ExportGraph(model, fp16).eval()
    example = torch.randn(batch_size or 2, 3, size, size)
    metadata = build_metadata(
        fingerprint=fingerprint,
        embedding_size=model.embedding_size,
        preprocessing=preprocessing,
        arch=model.cfg.arch,
        opset=opset,
        precision="fp16" if fp16 else "fp32",
        batch_size=batch_size,
    )
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if opset >= DYNAMO_MIN_OPSET:
                _export_dynamo(graph, example, path, metadata, opset, batch_size, external_data)
            else:
                _export_torchscript(graph, example, path, metadata, opset, batch_size, external_data)
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for opset {opset}: {type(exc).__name__}: {exc}") from exc
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected the exported model: {exc}") from exc
    found = _opset_of(path)
    if found != opset:
        raise ExportError(f"asked for opset {opset} but the exporter produced opset {found}; try --opset {found}")
    return metadata


# ---------------------------------------------------------------------------------------------
# parity


@dataclass
class ParityReport:
    """onnxruntime vs torch (fp32, CPU) on the same preprocessed images."""

    source: str  # where the images came from, e.g. "8 images from folder X", "8 random tensors"
    num_images: int
    precision: str  # "fp32" | "fp16"
    provider: str
    max_abs_diff: float
    min_cosine: float

    @property
    def passed(self) -> bool:
        if self.precision == "fp16":
            return self.min_cosine >= FP16_MIN_COSINE
        return self.max_abs_diff <= FP32_MAX_ABS_DIFF

    @property
    def criterion(self) -> str:
        if self.precision == "fp16":
            return f"min cosine >= {FP16_MIN_COSINE}"
        return f"max abs diff <= {FP32_MAX_ABS_DIFF:g}"

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"parity {verdict} ({self.criterion}) on {self.source} with {self.provider}: "
            f"max abs diff {self.max_abs_diff:.3g}, min cosine {self.min_cosine:.6f}"
        )


def _evenly(items: Sequence[Any], count: int) -> list[Any]:
    if len(items) <= count:
        return list(items)
    idx = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in idx]


def _load_batch(paths: Sequence[Path], prep: Preprocessing) -> np.ndarray:
    arrays = []
    for p in paths:
        try:
            arrays.append(preprocess_eval(open_image(p), prep))
        except ImageLoadError:
            continue  # a corrupt file in a user folder should not abort the export
    return np.stack(arrays) if arrays else np.zeros((0, 3, prep.image_size, prep.image_size), np.float32)


def parity_images(
    prep: Preprocessing,
    *,
    folder: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
    data_root: str | os.PathLike[str] | None = None,
    count: int = 8,
    seed: int = 0,
) -> tuple[np.ndarray, str]:
    """(batch (N, 3, S, S) float32 preprocessed, description of the source).

    A folder wins over a dataset; a dataset uses images spread over its gallery split. Without
    either (or when they hold no readable image) the batch is random normalised-space noise, and
    the description says so.
    """
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise ExportError(f"parity image folder not found: {folder}")
        batch = _load_batch(_evenly(image_files(folder), count), prep)
        if len(batch):
            return batch, f"{len(batch)} images from {folder}"
        note = f"no readable images in {folder}"
    elif dataset is not None and data_root is not None:
        from retrieval.data import load_dataset

        split = load_dataset(dataset, data_root).gallery_split()
        batch = _load_batch(_evenly(list(split.paths), count), prep)
        if len(batch):
            return batch, f"{len(batch)} images from {dataset} {split.name} split"
        note = f"no readable images in the {dataset} dataset at {data_root}"
    else:
        note = "no images given"
    rng = np.random.default_rng(seed)
    batch = rng.standard_normal((count, 3, prep.image_size, prep.image_size)).astype(np.float32)
    return batch, f"{count} random tensors ({note})"


@torch.inference_mode()
def torch_reference(model: Embedder, batch: np.ndarray, chunk: int = 32) -> np.ndarray:
    """(N, 3, S, S) -> (N, D) float32 with the fp32 model on CPU, the ground truth of parity."""
    model = model.cpu().float().eval()
    out = [model(torch.from_numpy(batch[i : i + chunk])).numpy() for i in range(0, len(batch), chunk)]
    return np.concatenate(out, axis=0).astype(np.float32)


def check_parity(model: Embedder, backend: OnnxBackend, batch: np.ndarray, source: str) -> ParityReport:
    expected = torch_reference(model, batch)
    got = backend.embed_array(batch)
    if got.shape != expected.shape:
        raise ParityError(f"onnxruntime output {got.shape} differs in shape from torch {expected.shape}")
    cos = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1) + 1e-12)
    return ParityReport(
        source=source,
        num_images=len(batch),
        precision=backend.precision,
        provider=backend.provider,
        max_abs_diff=float(np.abs(got - expected).max()),
        min_cosine=float(cos.min()),
    )


# ---------------------------------------------------------------------------------------------
# the whole job


@dataclass
class ExportResult:
    path: Path
    files: list[Path]  # the model and, with external data, its weights file
    metadata: dict[str, str]
    parity: ParityReport | None
    size_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def export_embedder(
    model: Embedder,
    preprocessing: Preprocessing,
    out: str | os.PathLike[str],
    *,
    fingerprint: str,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    batch_size: int | None = None,
    external_data: bool = False,
    parity_batch: np.ndarray | None = None,
    parity_source: str = "",
    providers: Sequence[Any] | None = None,
) -> ExportResult:
    """Export, check, verify parity (when `parity_batch` is given), then move into place.

    Raises ParityError (nothing written) when onnxruntime disagrees with torch beyond tolerance.
    """
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name such as {out / 'model.onnx'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / out.name
        metadata = write_onnx(
            model,
            preprocessing,
            staged,
            fingerprint=fingerprint,
            opset=opset,
            fp16=fp16,
            batch_size=batch_size,
            external_data=external_data,
        )
        report = None
        if parity_batch is not None:
            backend = OnnxBackend(staged, providers=providers or [CPU])
            report = check_parity(model, backend, parity_batch, parity_source)
            del backend
            if not report.passed:
                raise ParityError(report.summary() + f". {out} was not written.")
        staged_files = [f for f in Path(tmp).iterdir() if f != staged] + [staged]  # weights before the model
        stale = out.with_name(out.name + ".data")
        if stale.exists() and not any(f.name == stale.name for f in staged_files):
            stale.unlink()  # weights of an earlier external-data export to this path
            notes.append(f"removed {stale} left by an earlier export")
        files = []
        for f in staged_files:
            fsync_file(f)
            target = out.with_name(f.name)
            os.replace(f, target)
            files.append(target)
    return ExportResult(
        path=out,
        files=files,
        metadata=metadata,
        parity=report,
        size_bytes=sum(f.stat().st_size for f in files),
        notes=notes,
    )


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    batch_size: int | None = None,
    external_data: bool = False,
    parity: bool = True,
    parity_folder: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
    data_root: str | os.PathLike[str] | None = None,
    parity_count: int = 8,
    providers: Sequence[Any] | None = None,
) -> ExportResult:
    """`retrieval export`: checkpoint -> verified ONNX file.

    Parity images: `parity_folder`, else the dataset named (default: the checkpoint's own dataset
    and root, when they load), else random tensors.
    """
    from retrieval.checkpoint import embedder_from_checkpoint

    model, cfg, prep, fp = embedder_from_checkpoint(checkpoint)
    batch, source, notes = None, "", []
    if parity:
        explicit = dataset is not None or data_root is not None
        if explicit and parity_folder is None and (dataset or cfg.data.dataset) and not (data_root or cfg.data.root):
            raise ExportError(f"parity images from dataset {dataset or cfg.data.dataset!r} need --data-root")
        dataset = dataset or cfg.data.dataset
        data_root = data_root or cfg.data.root
        if not explicit and parity_folder is None and data_root is not None and not Path(data_root).exists():
            notes.append(f"the checkpoint's dataset folder {data_root} is not on this machine")
            dataset = data_root = None
        try:
            batch, source = parity_images(
                prep, folder=parity_folder, dataset=dataset, data_root=data_root, count=parity_count
            )
        except ExportError:
            raise
        except Exception as exc:  # the checkpoint's dataset may live on another machine
            if explicit:
                raise ExportError(f"cannot load parity images from {dataset} at {data_root}: {exc}") from exc
            notes.append(f"the checkpoint's dataset {dataset!r} at {data_root} did not load ({exc})")
            batch, source = parity_images(prep, count=parity_count)
    result = export_embedder(
        model,
        prep,
        out,
        fingerprint=fp,
        opset=opset,
        fp16=fp16,
        batch_size=batch_size,
        external_data=external_data,
        parity_batch=batch,
        parity_source=source,
        providers=providers,
    )
    result.notes[:0] = notes
    return result
