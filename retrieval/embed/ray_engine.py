"""The Ray engine: embedding parts with Ray Data batch inference over an actor pool (optional extra `ray`).

Each actor opens the embedder once (torch checkpoint, untrained seed or ONNX model, from the record
the manifest keeps) and then takes one part at a time from the queue: it embeds the part with the
same `embed_part` as the local engine and writes the part's files itself, so every node must see the
output folder (a shared filesystem on a cluster; any local folder on one machine). The driver only
plans, reports progress and finalizes. A crashed worker or driver leaves every finished part in place;
the same command run again embeds only what is missing.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.embed.job import EmbedOptions, PartResult, PartTask, Progress, run_part
from retrieval.embed.parts import EmbeddingsFolder, PartsError
from retrieval.errors import UsageError


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray job runs."""

    address: str | None = None  # None: start Ray on this machine; "auto": join the running cluster; "HOST:PORT"
    workers: int = 2  # actors (each loads the embedder once)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # > 0: actors are placed on GPUs and embed there
    retries: int = 2  # restarts of a dead actor before the job stops (finished parts are kept either way)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise UsageError(f"--workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise UsageError("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")


def import_ray() -> Any:
    """Ray, or an error saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise UsageError(
            "the ray engine needs Ray: install the extra with `pip install -e .[ray]` (or use --engine local)"
        ) from exc
    return ray


def connect(options: RayOptions) -> Any:
    """Join the cluster at options.address, or start Ray here; reuses a runtime already started by the caller."""
    ray = import_ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"logging_level": "warning", "include_dashboard": False}
        if options.address:
            kwargs = {"address": options.address, "logging_level": "warning"}
        if os.environ.get("PYTHONPATH"):  # workers import this package the way the driver does (a checkout)
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}}
        ray.init(**kwargs)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset INFO lines would bury our progress bar
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own bar reports images/s and ETA over the whole job
    return ray


class PartEmbedder:
    """A Ray Data actor: opens the embedder once, then embeds and writes whole parts handed to it."""

    def __init__(
        self,
        folder: str,
        embedder_source: dict[str, Any],
        fingerprint: str,
        device: str,
        options: dict[str, Any],
        threads: int,
    ) -> None:
        from retrieval.embed.spec import open_recorded

        if device == "cpu":
            try:
                import torch

                torch.set_num_threads(max(1, threads))
            except ImportError:
                pass
        self.folder = folder
        self.options = EmbedOptions(**options)
        self.backend = open_recorded(embedder_source, device)
        if self.backend.fingerprint != fingerprint:
            raise PartsError(
                f"{folder}: a worker opened embedder {self.backend.fingerprint} but the job embeds with "
                f"{fingerprint}; the embedder file changed on this node"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {"name": [], "n": [], "n_bad": [], "seconds": [], "worker": []}
        for text in batch["task"]:
            result = run_part(self.folder, self.backend, PartTask.from_json(str(text)), self.options)
            for key, value in asdict(result).items():
                out[key].append(value)
        return {key: np.asarray(values) for key, values in out.items()}


def run_ray(
    folder: EmbeddingsFolder,
    tasks: Sequence[PartTask],
    options: EmbedOptions,
    ray_options: RayOptions,
    progress: bool = True,
    on_part: Callable[[PartResult], None] | None = None,
) -> list[PartResult]:
    """Embed `tasks` on a Ray actor pool of `ray_options.workers` actors; returns per-part results as they finish."""
    if not tasks:
        return []
    ray = connect(ray_options)
    manifest = folder.manifest
    device = "cuda" if ray_options.gpus_per_worker > 0 else "cpu"
    threads = max(1, int(ray_options.cpus_per_worker))
    actor_options = asdict(options)
    if not options.decode_threads:
        actor_options["decode_threads"] = threads
    ds = ray.data.from_items([{"task": t.to_json()} for t in tasks], override_num_blocks=len(tasks))
    with warnings.catch_warnings():  # Ray documents max_restarts here although it flags extra arguments
        warnings.simplefilter("ignore")
        ds = ds.map_batches(
            PartEmbedder,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=ray_options.workers, max_tasks_in_flight_per_actor=1),
            fn_constructor_kwargs={
                "folder": str(Path(folder.folder).resolve()),
                "embedder_source": manifest["embedder_source"],
                "fingerprint": manifest["fingerprint"],
                "device": device,
                "options": actor_options,
                "threads": threads,
            },
            num_cpus=ray_options.cpus_per_worker,
            num_gpus=ray_options.gpus_per_worker or None,
            max_restarts=ray_options.retries,
            max_task_retries=ray_options.retries,
        )
    bar = Progress(sum(len(t.rows) for t in tasks), progress)
    results: list[PartResult] = []
    try:
        for row in ds.iter_rows():
            result = PartResult(
                str(row["name"]), int(row["n"]), int(row["n_bad"]), float(row["seconds"]), str(row["worker"])
            )
            results.append(result)
            bar.update(result.n + result.n_bad)
            if on_part is not None:
                on_part(result)
    except Exception as exc:  # a dead actor past its retries, a lost node, an error inside a worker
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        missing = len(folder.missing_parts())
        raise RuntimeError(
            f"the Ray job stopped ({type(exc).__name__}: {first}); {missing} parts are still missing in "
            f"{folder.folder}, finished parts are kept: rerun the same command to embed only the missing parts"
        ) from exc
    finally:
        bar.close()
    return results
