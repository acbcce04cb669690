"""`retrieval train`: train an embedder with a paper preset, overridable by a config file and flags.

Resolution order (later wins): the preset for (dataset, loss, mixup) -- or the checkpoint's config when
resuming -- then the --config JSON file, then the named flags, then --set KEY=VALUE.
Multi-GPU: `torchrun --nproc_per_node N "$(which retrieval)" train ...` (see REPRODUCE.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

import typer

from retrieval.data import DATASETS, dataset_choices
from retrieval.errors import ConfigError
from training import catalog

CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": tuple(DATASETS),
    "loss.name": catalog.loss_names(),
    "mixup.level": catalog.level_names(),
    "data.sampler": catalog.SAMPLERS,
    "train.amp": catalog.AMP_MODES,
    "mixup.lam_per": catalog.LAMBDA_PER,
    "mixup.pair_kind": catalog.PAIR_KINDS,
    "mixup.input_pairs": catalog.INPUT_PAIRS,
}
SECTIONS = ("data", "model", "loss", "mixup", "train")


def _merge(base: dict[str, Any], update: dict[str, Any], where: str) -> dict[str, Any]:
    """Deep-merge a (partial) RunConfig dict into a full one, refusing unknown sections and keys."""
    if not isinstance(update, dict):
        raise ConfigError(f"{where}: expected a JSON object with sections {list(SECTIONS)}")
    unknown = sorted(set(update) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; known sections: {list(SECTIONS)}")
    out = {k: dict(v) for k, v in base.items()}
    for section, values in update.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be an object of settings")
        bad = sorted(set(values) - set(out[section]))
        if bad:
            raise ConfigError(f"{where}: unknown {section} key(s) {bad}; known keys: {sorted(out[section])}")
        out[section].update(values)
    return out


def _coerce(key: str, raw: str, current: Any, optional: bool) -> Any:
    """Parse a --set value into the type of the setting it replaces."""
    if optional and raw.lower() in ("none", "null", ""):
        return None
    try:
        if isinstance(current, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
    except ValueError:
        raise ConfigError(f"--set {key}={raw}: expected a {type(current).__name__}") from None
    return raw


def _apply_sets(raw_cfg: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    from retrieval.config import RunConfig

    field_types = {
        f"{section.name}.{f.name}": str(f.type)
        for section in dataclasses.fields(RunConfig)
        for f in dataclasses.fields(getattr(RunConfig(), section.name))
    }
    for item in sets:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in field_types:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE with a key among {sorted(field_types)}")
        section, name = key.split(".")
        raw_cfg[section][name] = _coerce(key, value.strip(), raw_cfg[section][name], "None" in field_types[key])
    return raw_cfg


def _check_choices(raw_cfg: dict[str, Any]) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        if raw_cfg[section][name] not in allowed:
            raise ConfigError(f"{key}={raw_cfg[section][name]!r} is not one of {', '.join(allowed)}")


def _derive_resize(raw: dict[str, Any], base: dict[str, Any], file_cfg: dict[str, Any],
                   flags: dict[str, dict[str, Any]], sets: list[str]) -> None:
    """A new --image-size without a resize of its own brings the paper's 256/224 test-time resize along
    (--image-size 64 -> resize 73), instead of keeping the preset's, which would feed the model the
    central quarter of each test image."""
    from retrieval.config import default_resize_size

    given = (flags.get("data", {}).get("resize_size") is not None
             or "resize_size" in (file_cfg.get("data") or {})
             or any(item.partition("=")[0].strip() == "data.resize_size" for item in sets))
    if not given and raw["data"]["image_size"] != base["data"]["image_size"]:
        raw["data"]["resize_size"] = default_resize_size(int(raw["data"]["image_size"]))


def resolve_config(
    *,
    dataset: str | None,
    loss: str | None,
    mixup: str | None,
    config_file: Path | None = None,
    resume_config: dict[str, Any] | None = None,
    flags: dict[str, dict[str, Any]] | None = None,
    sets: list[str] | None = None,
) -> Any:
    """The RunConfig a `retrieval train` invocation means (see module docstring for the order)."""
    from retrieval.config import RunConfig, preset

    file_cfg: dict[str, Any] = {}
    if config_file is not None:
        try:
            file_cfg = json.loads(Path(config_file).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {config_file}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {config_file} is not valid JSON: {exc}") from None
        if not isinstance(file_cfg, dict):
            raise ConfigError(f"config file {config_file}: expected a JSON object with sections {list(SECTIONS)}")
    if resume_config is not None:
        base = resume_config
    else:
        dataset = dataset or file_cfg.get("data", {}).get("dataset")
        if not dataset:
            raise ConfigError(f"pass --dataset ({dataset_choices()})")
        loss = loss or file_cfg.get("loss", {}).get("name") or catalog.DEFAULT_LOSS
        mixup = mixup or file_cfg.get("mixup", {}).get("level") or catalog.DEFAULT_LEVEL
        for what, key, value in (("dataset", "data.dataset", dataset), ("loss", "loss.name", loss),
                                 ("mixup", "mixup.level", mixup)):
            if value not in CHOICES[key]:
                raise ConfigError(f"--{what} {value!r} is not one of {', '.join(CHOICES[key])}")
        base = preset(dataset, loss, mixup).to_dict()
    raw = _merge(base, file_cfg, str(config_file)) if file_cfg else {k: dict(v) for k, v in base.items()}
    top = {"data": {"dataset": dataset}, "loss": {"name": loss}, "mixup": {"level": mixup}}
    for section, values in list(top.items()) + list((flags or {}).items()):
        for key, value in values.items():
            if value is not None:
                raw[section][key] = value
    raw = _apply_sets(raw, sets or [])
    _derive_resize(raw, base, file_cfg, flags or {}, sets or [])
    _check_choices(raw)
    try:
        return RunConfig.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def _resume_path(resume: str, out_dir: str | None) -> Path:
    """--resume PATH (a checkpoint), DIR (its last.pt), or 'last' (the run folder's last.pt)."""
    from training.checkpointing import LAST_CHECKPOINT, resume_checkpoint

    if resume in ("last", "auto"):
        if not out_dir:
            raise ConfigError("--resume last needs --out (the run folder holding last.pt)")
        resume = str(Path(out_dir) / LAST_CHECKPOINT)
    path = resume_checkpoint(resume)
    if not path.is_file():
        raise ConfigError(f"--resume: checkpoint not found: {path}; pass a checkpoint, a run folder or 'last' with --out")
    return path


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_command(
        dataset: Optional[str] = typer.Option(None, "--dataset", help=f"{dataset_choices()}."),
        data_root: Optional[str] = typer.Option(
            None, "--data-root", help="Dataset folder in its official layout (demo: generated into data/demo if left out)."
        ),
        loss: Optional[str] = typer.Option(
            None, "--loss", help=f"{catalog.described(catalog.LOSSES)}. Default {catalog.DEFAULT_LOSS}."
        ),
        mixup: Optional[str] = typer.Option(
            None, "--mixup", help=f"Metrix level: {catalog.described(catalog.LEVELS)}. Default {catalog.DEFAULT_LEVEL}."
        ),
        config_file: Optional[Path] = typer.Option(None, "--config", help="JSON file shaped like the printed config; flags override it."),
        epochs: Optional[int] = typer.Option(None, "--epochs", min=1),
        lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate of trunk and embedding layer."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2, help="Global batch size (all GPUs together)."),
        image_size: Optional[int] = typer.Option(None, "--image-size", min=16, help="Training crop and test centre crop (the test resize follows at 256/224 unless --resize-size is given)."),
        resize_size: Optional[int] = typer.Option(None, "--resize-size", min=16, help="Test-time short-side resize (default: image size x 256/224)."),
        sampler: Optional[str] = typer.Option(None, "--sampler", help="random or balanced (P classes x K images)."),
        images_per_class: Optional[int] = typer.Option(None, "--images-per-class", min=1, help="K of balanced batches."),
        arch: Optional[str] = typer.Option(None, "--arch", help="resnet18, resnet34, resnet50 or resnet101."),
        embedding_size: Optional[int] = typer.Option(None, "--embedding-size", min=2),
        pretrained: Optional[str] = typer.Option(None, "--pretrained", help="imagenet, none, or a local torchvision weights file."),
        lr_step: Optional[int] = typer.Option(None, "--lr-step", min=1, help="StepLR period in epochs."),
        lr_gamma: Optional[float] = typer.Option(None, "--lr-gamma", help="StepLR factor."),
        weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
        warmup_epochs: Optional[int] = typer.Option(None, "--warmup-epochs", min=0, help="Epochs training only the embedding layer and loss parameters."),
        freeze_bn: Optional[bool] = typer.Option(None, "--freeze-bn/--no-freeze-bn", help="Keep BatchNorm in eval mode with frozen affine parameters."),
        bn_affine_after_warmup: Optional[bool] = typer.Option(None, "--bn-affine-after-warmup/--no-bn-affine-after-warmup", help="With --freeze-bn, train BatchNorm's scale and shift once warm-up ends (the official code)."),
        proxy_lr_mult: Optional[float] = typer.Option(None, "--proxy-lr-mult", help="Loss parameters' (proxies') lr multiplier."),
        grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Gradient value clipping threshold."),
        mix_weight: Optional[float] = typer.Option(None, "--mix-weight", help="w in clean + w * mixed."),
        mix_alpha: Optional[float] = typer.Option(None, "--mix-alpha", help="lam ~ Beta(alpha, alpha)."),
        lam_per: Optional[str] = typer.Option(None, "--lam-per", help="batch (one lam per batch, as the paper) or pair."),
        pair_kind: Optional[str] = typer.Option(None, "--pair-kind", help="random (official code: one kind per step; the table presets), both (the paper's V(a); demo and folders), positive or anchor."),
        input_pairs: Optional[str] = typer.Option(None, "--input-pairs", help="Input-level mixes: hardest (each positive with the anchor's closest negatives, as the official code) or random."),
        hard_negatives: Optional[int] = typer.Option(None, "--hard-negatives", min=1, help="Input level, hardest: closest negatives mixed per (anchor, positive) pair."),
        max_pairs: Optional[int] = typer.Option(None, "--max-pairs", min=0, help="Mixes per batch; 0 = every (positive, negative) combination."),
        amp: Optional[str] = typer.Option(None, "--amp", help="auto (bf16 on GPU), bf16, fp16 or none. CPU trains in float32."),
        compile_model: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile trunk and head."),
        compile_loss: Optional[bool] = typer.Option(None, "--compile-loss/--no-compile-loss", help="torch.compile the loss terms and embedding-level mixing (fewer kernel launches per step). Opt-in (default off)."),
        cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs/--no-cuda-graphs", help="Replay the whole training step from a CUDA graph. Opt-in (default off): not yet validated on a GPU by benchmarks/gpu_checks.sh. Applies where the step qualifies (CUDA, one process, bf16/fp32, no --compile, no deterministic algorithms; otherwise eager, with the reason printed); if capture or replay fails, training continues eagerly and says why."),
        channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="channels_last memory format on GPU."),
        eval_every: Optional[int] = typer.Option(None, "--eval-every", min=0, help="Evaluate every N epochs (always after the last; 0 = only then)."),
        out: Optional[str] = typer.Option(None, "--out", help="Run folder for checkpoints and metrics."),
        seed: Optional[int] = typer.Option(None, "--seed"),
        device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
        workers: Optional[int] = typer.Option(None, "--workers", min=0, help="DataLoader worker processes."),
        max_steps_per_epoch: Optional[int] = typer.Option(None, "--max-steps-per-epoch", min=0, help="Cap steps per epoch (0 = full epochs)."),
        cache: Optional[str] = typer.Option(None, "--cache", help="Decoded-image cache folder written by `retrieval prepare`."),
        sets: list[str] = typer.Option([], "--set", help="Any other setting: SECTION.KEY=VALUE, e.g. loss.ms_alpha=2 (repeatable)."),
        resume: Optional[str] = typer.Option(None, "--resume", help="Continue exactly from a checkpoint: PATH, a run folder, or 'last' (--out's last.pt)."),
        evaluate_before: bool = typer.Option(False, "--eval-before", help="Also evaluate the untrained model (logged as epoch 0)."),
        print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as JSON and exit."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
        deterministic: Optional[bool] = typer.Option(
            None, "--deterministic/--no-deterministic",
            help="Bit-identical reruns and resumes: deterministic algorithms only, fixed cuBLAS workspace, no cuDNN "
                 "autotuning, seeded loader workers (slower on GPU). See README, 'Exact resume'.",
        ),
    ) -> None:
        """Train an embedder with Metrix; writes last.pt, best.pt, metrics.jsonl/csv to the run folder."""
        from rich.console import Console

        console = Console(stderr=False)
        is_main = int(os.environ.get("RANK", "0")) == 0
        flags = {
            "data": dict(root=data_root, image_size=image_size, resize_size=resize_size, batch_size=batch_size,
                         sampler=sampler, images_per_class=images_per_class, workers=workers, cache=cache),
            "model": dict(arch=arch, embedding_size=embedding_size, pretrained=pretrained),
            "mixup": dict(weight=mix_weight, alpha=mix_alpha, lam_per=lam_per, pair_kind=pair_kind, max_pairs=max_pairs,
                          input_pairs=input_pairs, hard_negatives=hard_negatives),
            "train": dict(epochs=epochs, lr=lr, weight_decay=weight_decay, lr_step=lr_step, lr_gamma=lr_gamma,
                          warmup_epochs=warmup_epochs, freeze_bn=freeze_bn, bn_affine_after_warmup=bn_affine_after_warmup,
                          proxy_lr_mult=proxy_lr_mult,
                          grad_clip=grad_clip, seed=seed, amp=amp, channels_last=channels_last,
                          compile=compile_model, compile_loss=compile_loss, cuda_graphs=cuda_graphs, eval_every=eval_every,
                          out_dir=out, device=device, max_steps_per_epoch=max_steps_per_epoch, deterministic=deterministic),
        }  # fmt: skip
        from retrieval.checkpoint import load_checkpoint

        resume_path, resume_config = None, None
        if resume is not None:
            resume_path = _resume_path(resume, out)
            resume_config = load_checkpoint(resume_path)["config"]
        cfg = resolve_config(
            dataset=dataset, loss=loss, mixup=mixup, config_file=config_file,
            resume_config=resume_config, flags=flags, sets=sets,
        )  # fmt: skip
        if out is None and resume is None and cfg.train.out_dir == "runs/default":
            # one folder per results-table cell, so runs of different cells never overwrite each other
            run_name = f"{cfg.data.dataset}-{cfg.loss.name}-{cfg.mixup.level}"
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=f"runs/{run_name}"))
        if print_config:
            if is_main:
                print(json.dumps(cfg.to_dict(), indent=2))
            raise typer.Exit()

        from training.trainer import train

        result = train(cfg, progress=not quiet, resume=resume_path, evaluate_before=evaluate_before)
        if is_main:
            console.print(result.summary(), highlight=False, soft_wrap=True)
