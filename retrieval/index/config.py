"""How a gallery is indexed: the requested index type, a value for every knob, the memory budget.

IndexConfig lives beside the type registry and the knobs it is made of (retrieval.index.knobs): its knob
fields are generated from their declaration and its type is checked against the registry, so the base
config module (retrieval.config) needs nothing from the index floor. Which search setting a build keeps
is retrieval.config.CalibrationConfig.
"""

from __future__ import annotations

from dataclasses import dataclass

from retrieval.index.knobs import KnobValues, knob_fields
from retrieval.index.types import index_type


@dataclass
@knob_fields(lambda knob: knob.default, after="index_type")
class IndexConfig(KnobValues):
    """How a gallery is indexed.

    After `index_type`, one int field per knob of retrieval.index.knobs.INDEX_KNOBS (nlist, nprobe, pq_m,
    pq_nbits, hnsw_m, ef_construction, ef_search, refine_factor, train_size), defaulting as declared there.
    """

    index_type: str = "auto"  # auto, or a type registered in retrieval.index.types.INDEX_TYPES
    memory_budget_gb: float = 4.0
    use_gpu: bool = True
    flat_max_items: int = 300_000  # "auto" keeps exact search up to here when it fits the memory budget

    def __post_init__(self) -> None:
        if self.index_type != "auto":
            index_type(self.index_type)  # IndexBuildError listing the registered types
