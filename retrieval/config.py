"""Configuration: one dataclass per concern, and the paper's presets in one place.

Everything here is plain data (str/int/float/bool/tuple/None) so that a config can be stored in a
checkpoint or index metadata as JSON and read back with `from_dict` without pickle. An index build's
IndexConfig lives with the index knobs it is made of (retrieval.index.config); merging a preset, a config
file, flags and --set into a RunConfig is retrieval.config_resolve.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from retrieval.errors import ConfigError
from training import catalog, levels

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


RESIZE_RATIO = 256 / 224  # the paper's test-time short-side resize relative to the centre crop


def default_resize_size(image_size: int) -> int:
    """Test-time short-side resize for a centre crop of `image_size` (256 for 224, 73 for 64)."""
    return int(round(image_size * RESIZE_RATIO))


@dataclass
class DataConfig:
    """Where the images are and how batches are drawn."""

    dataset: str = "demo"
    root: str | None = None
    image_size: int = 224  # side of the square crop fed to the network
    resize_size: int = 256  # test-time short-side resize before the centre crop (default_resize_size)
    batch_size: int = 100
    crop_scale_min: float = 0.08  # RandomResizedCrop area range (min, 1); 0.08 is torchvision's and the paper's
    sampler: str = "random"  # training.catalog.SAMPLERS
    images_per_class: int = 5  # K of a P x K balanced batch; P = batch_size // K
    workers: int = 4
    cache: str | None = None  # decoded-image cache folder written by `retrieval prepare`


@dataclass
class ModelConfig:
    """The embedder: ResNet trunk -> avg+max pool -> Linear -> L2 norm."""

    arch: str = "resnet50"
    embedding_size: int = 512
    pretrained: str = "imagenet"  # "imagenet", "none", or a path to a local torchvision weights file


@dataclass
class LossConfig:
    """Which pair loss and its hyper-parameters (defaults: the values behind the paper's numbers)."""

    name: str = catalog.DEFAULT_LOSS  # a name from training.catalog.LOSSES
    # contrastive
    pos_margin: float = 0.0
    neg_margin: float = 0.5
    # multi-similarity
    ms_alpha: float = 17.97
    ms_beta: float = 75.66
    ms_base: float = 0.77
    ms_miner_epsilon: float = 0.39
    # proxy-anchor
    pa_alpha: float = 32.0
    pa_margin: float = 0.1


@dataclass
class MixupConfig:
    """Metrix: what is mixed, how strongly, and how much it weighs in the objective."""

    level: str = "none"  # a name from training.levels.LEVELS
    alpha: float = 2.0  # lam ~ Beta(alpha, alpha)
    weight: float = 0.4  # w in  E = clean + w * mixed
    lam_per: str = "batch"  # training.catalog.LAMBDA_PER
    # "both": V(a) as the paper defines it (positive-negative mixes, and anchor-negative mixes for anchors
    # without an in-batch positive). "random": the official code's one kind per step, probability 1/2
    # each (the table presets); a kind with no valid pair in the batch gives way to the other, so
    # class-balanced batches (no anchor lacks a positive) mix positive-negative pairs at every step.
    pair_kind: str = "both"  # training.catalog.PAIR_KINDS
    max_pairs: int = 0  # 0 = every (positive, negative) combination; > 0 = fixed budget per batch
    # Input level only: "hardest" mixes each (anchor, positive) pair's positive with the anchor's
    # `hard_negatives` closest negatives, as the official input mode; "random" draws valid pairs at random.
    input_pairs: str = "hardest"  # training.catalog.INPUT_PAIRS
    hard_negatives: int = 1


@dataclass
class TrainConfig:
    """The optimisation recipe and the run's bookkeeping."""

    epochs: int = 60
    lr: float = 1e-4
    weight_decay: float = 1e-4
    lr_step: int = 10
    lr_gamma: float = 0.5
    warmup_epochs: int = 5  # epochs training only the embedding layer and loss parameters
    freeze_bn: bool = True
    # With freeze_bn, BatchNorm statistics stay frozen, but its scale and shift train again once warm-up
    # ends (the official code's warm-up re-enables every trunk parameter); no warm-up: they stay frozen.
    bn_affine_after_warmup: bool = True
    proxy_lr_mult: float = 100.0
    grad_clip: float = 10.0
    seed: int = 1
    amp: str = "auto"  # training.catalog.AMP_MODES
    channels_last: bool = True
    compile: bool = False
    compile_loss: bool = False  # torch.compile the loss terms and embedding-level mixing (fewer launches)
    # Opt-in until benchmarks/gpu_checks.sh has validated it on a GPU: replay the whole step from a CUDA graph
    # where it qualifies, falling back to the eager step (saying why) if the graph fails (training/step.py)
    cuda_graphs: bool = False
    eval_every: int = 1
    out_dir: str = "runs/default"
    device: str = "auto"
    max_steps_per_epoch: int = 0  # 0 = full epoch; > 0 caps steps (smoke runs, demos)
    deterministic: bool = False  # bit-identical reruns and resumes (training/determinism.py); slower on GPU


@dataclass
class CalibrationConfig:
    """How an approximate index chooses its search setting at build time (retrieval.index.calibrate).

    A seeded sample of gallery vectors is searched as queries (each excluding itself); the cheapest
    setting whose Recall@k against exact search reaches `target_recall` is kept.
    """

    target_recall: float = 0.95  # 0 = keep the given nprobe / efSearch / refine factor, measure nothing
    k: int = 10
    queries: int = 1000  # gallery vectors held out as calibration queries (fewer when the gallery is smaller)
    seed: int = 0
    sweep: bool = True  # False: measure the given setting only (it was fixed on the command line)


@dataclass
class RunConfig:
    """Everything a training run needs, stored verbatim in its checkpoints."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        return cls(
            data=from_dict(DataConfig, raw.get("data", {})),
            model=from_dict(ModelConfig, raw.get("model", {})),
            loss=from_dict(LossConfig, raw.get("loss", {})),
            mixup=from_dict(MixupConfig, raw.get("mixup", {})),
            train=from_dict(TrainConfig, raw.get("train", {})),
        )


T = TypeVar("T")


def from_dict(cls: type[T], raw: dict[str, Any]) -> T:
    """Build a dataclass from a dict, refusing unknown keys so typos in config files fail loudly."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(names)}")
    return cls(**raw)


def override(obj: T, **changes: Any) -> T:
    """Return a copy with the non-None changes applied (how CLI flags override presets)."""
    return dataclasses.replace(obj, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[type-var]


# ----------------------------------------------------------------------------------------------
# Paper presets (metrix-spec section 3). Keyed by dataset family and loss; Metrix on CUB with MS/PA
# trains longer (100 epochs, step 10).
# ----------------------------------------------------------------------------------------------

_SMALL = ("cub", "cars")
_LARGE = ("sop", "inshop")


def paper_train_preset(dataset: str, loss: str, mixup_level: str = "none") -> TrainConfig:
    """The official recipe's optimiser/schedule values for a dataset x loss x mixup cell.

    Each value is the official README command's (or, where a flag is absent, main.py's default); REPRODUCE.md
    lists the source of every cell. Metrix cells of MS/PA other than CUB use their baseline's values, as the
    README says. A cell without published values (folder, demo, a loss without a recipe) gets a short schedule.
    """
    catalog.loss(loss)  # refuses a loss the catalog does not list
    recipe = _PAPER_TRAIN_RECIPES.get(loss)
    cell = recipe(dataset, levels.level(mixup_level).mixes) if recipe is not None else None
    # folder / demo: a short schedule that suits small custom data and trains the BN statistics.
    return cell or TrainConfig(epochs=20, lr=1e-4, lr_step=10, lr_gamma=0.5, warmup_epochs=1, freeze_bn=False)


def _contrastive_recipe(dataset: str, mixed: bool) -> TrainConfig | None:
    if dataset in _SMALL:
        return TrainConfig(epochs=60, lr=1e-4, lr_step=10, lr_gamma=0.1, warmup_epochs=5, freeze_bn=True)
    if dataset == "sop":  # the Metrix command drops --bn_freeze 0: BatchNorm frozen there
        return TrainConfig(epochs=60, lr=3e-5, lr_step=10, lr_gamma=0.25, warmup_epochs=5, freeze_bn=mixed)
    if dataset == "inshop" and not mixed:
        return TrainConfig(epochs=60, lr=3e-5, lr_step=5, lr_gamma=0.25, warmup_epochs=1, freeze_bn=False)
    if dataset == "inshop":
        return TrainConfig(epochs=60, lr=1e-4, lr_step=10, lr_gamma=0.25, warmup_epochs=5, freeze_bn=True)
    return None


def _similarity_recipe(dataset: str, mixed: bool) -> TrainConfig | None:
    """Multi-similarity and proxy-anchor share their recipe."""
    if dataset == "cub" and mixed:
        return TrainConfig(epochs=100, lr=1e-4, lr_step=10, lr_gamma=0.5, warmup_epochs=5, freeze_bn=True)
    if dataset in _SMALL:
        return TrainConfig(epochs=60, lr=1e-4, lr_step=5, lr_gamma=0.5, warmup_epochs=5, freeze_bn=True)
    if dataset in _LARGE:
        return TrainConfig(epochs=60, lr=6e-4, lr_step=20, lr_gamma=0.25, warmup_epochs=1, freeze_bn=False)
    return None


# The published recipes, per loss of training.catalog.LOSSES that has one: (dataset, mixes) -> values or None.
_PAPER_TRAIN_RECIPES: dict[str, Callable[[str, bool], TrainConfig | None]] = {
    "contrastive": _contrastive_recipe,
    "ms": _similarity_recipe,
    "pa": _similarity_recipe,
}


def paper_mixup_preset(dataset: str, loss: str, mixup_level: str) -> MixupConfig:
    """How a table cell mixes: the official code's pair kind, one at random per step (train.py), except
    multi-similarity at the embedding level, which mixes positive-negative pairs at every step there."""
    if dataset not in _SMALL + _LARGE:
        return MixupConfig(level=mixup_level)
    kind: Literal["random", "positive"] = "positive" if (loss, mixup_level) == ("ms", "embedding") else "random"
    return MixupConfig(level=mixup_level, pair_kind=kind)


def paper_data_preset(dataset: str) -> DataConfig:
    """Random batches on CUB/Cars, class-balanced 20 x 5 on SOP/In-Shop (as the official code)."""
    sampler = "balanced" if dataset in _LARGE else "random"
    return DataConfig(dataset=dataset, sampler=sampler, batch_size=100, images_per_class=5)


def demo_run_config() -> RunConfig:
    """Small, fast settings for the embedded demo dataset on a CPU: a half-width ResNet-18 at 64 px, from scratch.

    Many products with few photos each (the embedder sees many identities), a trunk light enough for 25 epochs
    over them in under 3 minutes on 2 CPU cores, and the multi-similarity loss at the MS paper's own hyper-parameters
    (alpha 2, beta 50, lambda 0.5, mining epsilon 0.1): the Metrix paper's values are tuned for ImageNet-
    initialised trunks and move a trunk trained from scratch less. 25 epochs with the step at 10 rather than 15 with
    the step at 6: the drawing's backdrops and occlusion mattered more (retrieval/data/demo.py), but the shorter
    schedule stopped short of the plateau. Larger minimum crops than ImageNet's 0.08 (0.5): at 64 px a small crop
    usually misses the object.
    Deterministic: two runs on the same machine give the same numbers.
    """
    return RunConfig(
        data=DataConfig(
            dataset="demo",
            image_size=64,
            resize_size=64,
            batch_size=60,
            sampler="balanced",
            images_per_class=4,
            workers=0,
            crop_scale_min=0.5,
        ),
        model=ModelConfig(arch="resnet18-half", embedding_size=128, pretrained="none"),
        loss=LossConfig(name="ms", ms_alpha=2.0, ms_beta=50.0, ms_base=0.5, ms_miner_epsilon=0.1),
        mixup=MixupConfig(level="feature"),
        train=TrainConfig(
            epochs=25,
            lr=3e-3,
            lr_step=10,
            lr_gamma=0.3,
            warmup_epochs=0,
            freeze_bn=False,
            eval_every=0,
            out_dir="runs/demo",
            channels_last=False,
            deterministic=True,
        ),
    )


def preset(dataset: str, loss: str = catalog.DEFAULT_LOSS, mixup_level: str = "none") -> RunConfig:
    """The full run configuration for a dataset x loss x mixup cell."""
    if dataset == "demo":
        cfg = demo_run_config()
        cfg.loss = dataclasses.replace(cfg.loss, name=loss)  # the demo's MS settings; other losses' defaults
        cfg.mixup = MixupConfig(level=mixup_level)
        return cfg
    return RunConfig(
        data=paper_data_preset(dataset),
        model=ModelConfig(),
        loss=LossConfig(name=loss),
        mixup=paper_mixup_preset(dataset, loss, mixup_level),
        train=paper_train_preset(dataset, loss, mixup_level),
    )
