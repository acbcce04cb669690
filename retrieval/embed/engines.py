"""Where bulk embedding runs: one call that embeds a job's missing parts on the chosen engine.

    local  this process, part after part (`retrieval.embed.job.run_local`)
    ray    a Ray Data actor pool (`retrieval.embed.ray_engine.run_ray`, optional extra `ray`)

The engine names are declared once in `retrieval.embed.ENGINES` (import-light, for the CLI's help);
this module is the dispatcher one level above both engines: job.py (the job, its parts and the local
engine) and ray_engine.py (which embeds each part with job's `run_part`) never import it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.embed import ENGINES
from retrieval.embed.backend import EmbeddingBackend
from retrieval.embed.job import (
    EmbedOptions,
    EmbedSource,
    PartResult,
    finalize,
    open_job,
    plan_tasks,
    run_local,
)
from retrieval.embed.parts import part_is_done
from retrieval.errors import UsageError


@dataclass
class EmbedReport:
    """What one `retrieval embed` run did."""

    folder: Path
    parts_total: int
    parts_done_before: int
    results: list[PartResult] = field(default_factory=list)
    seconds: float = 0.0
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return sum(r.n + r.n_bad for r in self.results)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def embed_to_parts(
    out: str | os.PathLike[str],
    source: EmbedSource,
    backend: EmbeddingBackend,
    options: EmbedOptions | None = None,
    *,
    engine: str = "local",
    ray_options: Any = None,
    progress: bool = True,
    on_part: Callable[[PartResult], None] | None = None,
) -> EmbedReport:
    """Embed `source` into parts under `out`, skipping parts already complete; finalize the manifest.

    engine "local" embeds here with `backend`; "ray" hands the missing parts to a Ray actor pool
    (each actor re-opens the backend's embedder once). A crash leaves every finished part
    in place; running the same call again embeds only the missing ones.
    """
    options = options or EmbedOptions()
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    t0 = time.perf_counter()
    folder = open_job(out, source, backend, options)
    tasks = plan_tasks(source, options.part_size)
    missing = [t for t in tasks if not part_is_done(folder.folder, t.name)]
    report = EmbedReport(folder.folder, len(tasks), len(tasks) - len(missing))
    if engine == "local":
        report.results = run_local(folder, backend, missing, options, progress, on_part)
    else:
        from retrieval.embed.ray_engine import RayOptions, run_ray

        report.results = run_ray(folder, missing, options, ray_options or RayOptions(), progress, on_part)
    report.seconds = time.perf_counter() - t0
    report.manifest = finalize(folder)
    return report
