"""The index knobs, each declared once: name, value type, default, help, range and flag.

A knob is a number an index type is built or searched with (IVF lists, PQ code size, HNSW graph width, the
search setting calibration picks, ...). Each IndexType in retrieval.index.types names the knobs it reads.
From this declaration come

    IndexConfig's knob fields (retrieval.index.config)   the requested values, defaults as declared here
    IndexParams' knob fields (retrieval.index.types)   the concrete values of one built index, 0 = unused
    the `retrieval index` flags (retrieval.cli.index_options)   name, default, range and help as declared here

so a new knob is one entry in INDEX_KNOBS (and its name in the knobs of the types that read it). This module
imports nothing from the package: IndexConfig and the type registry both read it, and it reads neither.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar


@dataclass(frozen=True)
class Knob:
    """One build or search setting of an index type, as IndexConfig, IndexParams and the command line see it."""

    field: str  # the IndexConfig / IndexParams field
    default: int  # IndexConfig's default (the value asked for when nothing else is said)
    help: str  # the --flag's help
    minimum: int | None = None  # the flag's range
    maximum: int | None = None
    value_type: type = int
    # A search setting build-time calibration picks (retrieval.index.calibrate): the flag defaults to "not given",
    # and giving it fixes the setting instead of sweeping it.
    calibrated: bool = False
    cli: bool = True  # False: a config-only setting (benchmarks, the Python API) without a flag
    label: str = ""  # how people call it ("efSearch", "refine factor"); default: the field name
    applies_to: str = ""  # which indexes search with it, for people ("IVF indexes")

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.field)

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


NPROBE = Knob(
    "nprobe",
    16,
    "IVF lists scanned per query (default: calibrated to --target-recall).",
    minimum=1,
    calibrated=True,
    applies_to="IVF indexes",
)
EF_SEARCH = Knob(
    "ef_search",
    128,
    "HNSW search beam width (default: calibrated to --target-recall).",
    minimum=1,
    calibrated=True,
    label="efSearch",
    applies_to="HNSW indexes",
)
REFINE = Knob(
    "refine_factor",
    0,
    "Re-rank k x this many approximate candidates exactly (0 = off).",
    minimum=0,
    label="refine factor",
    applies_to="approximate indexes",
)

# In the order of the flags in `retrieval index --help` and of the fields in meta.json's index_params.
INDEX_KNOBS: dict[str, Knob] = {
    k.field: k
    for k in (
        Knob("nlist", 0, "IVF lists (0 = about 4 sqrt(N)).", minimum=0),
        NPROBE,
        Knob(
            "coarse_hnsw_m",
            0,
            "IVF coarse quantizer as an HNSW graph with this many neighbours per centroid, so adding "
            "costs log(nlist), not nlist (0 = brute-force assignment; 32 suits nlist >= 16,384).",
            minimum=0,
            label="coarse HNSW M",
        ),
        Knob("pq_m", 64, "IVF-PQ / fast-scan sub-quantizers (bytes per vector at 8 bits, half that at 4).", minimum=1),
        Knob("pq_nbits", 8, "IVF-PQ bits per sub-code.", minimum=1, maximum=16),
        Knob(
            "opq",
            0,
            "Rotate vectors with OPQ before PQ codes (1 = on; ivf-pq, ivf-fastscan).",
            minimum=0,
            maximum=1,
            label="OPQ",
        ),
        # 48 / 120: at 1M catalogue vectors (512-d) a 32 / 80 graph stopped at Recall@10 0.94 whatever efSearch;
        # 48 / 120 reached 0.95 at efSearch 128 for 40% more build time and 5% more memory (docs/benchmarks.md)
        Knob("hnsw_m", 48, "HNSW neighbours per node.", minimum=2),
        Knob("ef_construction", 120, "HNSW build beam width.", minimum=1),
        EF_SEARCH,
        REFINE,
        Knob(
            "train_size", 0, "Vectors sampled (seeded) to train IVF/PQ (0 = chosen from nlist).", minimum=0, cli=False
        ),
    )
}


class KnobValues:
    """The knob fields `knob_fields` adds to a dataclass, spelt out for the type checker.

    A plain class, not a dataclass: the dataclasses that inherit it get their fields from `knob_fields`
    (these annotations make no field), and type checkers see each knob as an int attribute.
    tests/test_index_types.py checks that these annotations are exactly INDEX_KNOBS, in order.
    """

    nlist: int
    nprobe: int
    coarse_hnsw_m: int
    pq_m: int
    pq_nbits: int
    opq: int
    hnsw_m: int
    ef_construction: int
    ef_search: int
    refine_factor: int
    train_size: int


def knob_values(**values: int) -> dict[str, Any]:
    """Keyword arguments setting knobs of an IndexParams / IndexConfig (typed loosely: their fields are generated).

    An unknown name is a bug in the caller, so it raises at once."""
    unknown = sorted(set(values) - set(INDEX_KNOBS))
    if unknown:
        raise TypeError(f"unknown index knobs: {unknown}")
    return dict(values)


def knob_label(field: str) -> str:
    """How people call a search setting (IndexParams field name -> "efSearch", "refine factor", ...)."""
    knob = INDEX_KNOBS.get(field)
    return knob.label if knob is not None else field


T = TypeVar("T")


def knob_fields(default: Callable[[Knob], Any], after: str) -> Callable[[type[T]], type[T]]:
    """Class decorator, applied beneath @dataclass: one field per declared knob, placed after the field `after`,
    with `default(knob)` as its default. The class declares only what is not a knob."""

    def add(cls: type[T]) -> type[T]:
        own = dict(cls.__dict__.get("__annotations__", {}))
        clash = sorted(set(own) & set(INDEX_KNOBS))
        if after not in own or clash:
            raise TypeError(
                f"{cls.__name__}: knob fields go after its field {after!r} and are not declared by hand ({clash})"
            )
        annotations: dict[str, Any] = {}
        for name, hint in own.items():
            annotations[name] = hint
            if name == after:
                for knob in INDEX_KNOBS.values():
                    annotations[knob.field] = knob.value_type
                    setattr(cls, knob.field, default(knob))
        cls.__annotations__ = annotations
        return cls

    return add
