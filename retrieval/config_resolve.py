"""The RunConfig one `retrieval train` invocation means: a preset, a config file, flags and --set, merged.

Resolution order (later wins): the preset for (dataset, loss, mixup) -- or the checkpoint's config when
resuming -- then the --config JSON file, then the named flags, then --set SECTION.KEY=VALUE. A new image
size without a resize of its own brings the paper's 256/224 test-time resize along. Every key, section and
choice is checked, so a typo is a ConfigError naming it.

    cfg = resolve_config(dataset="cub", loss="ms", mixup="feature", config_file=None,
                         flags={"train": {"epochs": 5}}, sets=["loss.ms_alpha=2"])
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from retrieval.config import RunConfig, default_resize_size, preset
from retrieval.data import DATASETS, dataset_choices
from retrieval.errors import ConfigError
from training import catalog, levels

# The settings that take one of a list of names, and that list (read from the registries).
CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": tuple(DATASETS),
    "loss.name": catalog.loss_names(),
    "mixup.level": levels.level_names(),
    "data.sampler": catalog.SAMPLERS,
    "train.amp": catalog.AMP_MODES,
    "mixup.lam_per": catalog.LAMBDA_PER,
    "mixup.pair_kind": catalog.PAIR_KINDS,
    "mixup.input_pairs": catalog.INPUT_PAIRS,
}
SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig))  # data, model, loss, mixup, train

RawConfig = dict[str, dict[str, Any]]  # a RunConfig as JSON: section -> key -> value


def resolve_config(
    *,
    dataset: str | None,
    loss: str | None,
    mixup: str | None,
    config_file: Path | None = None,
    resume_config: dict[str, Any] | None = None,
    flags: dict[str, dict[str, Any]] | None = None,
    sets: list[str] | None = None,
) -> RunConfig:
    """The RunConfig a `retrieval train` invocation means (see the module docstring for the order).

    `flags` holds the named flags by section (None = not given); `resume_config` is the checkpoint's config.
    """
    file_cfg = read_config_file(config_file) if config_file is not None else {}
    if resume_config is not None:
        base = resume_config
    else:
        dataset, loss, mixup = _table_cell(dataset, loss, mixup, file_cfg)
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


def read_config_file(path: Path) -> dict[str, Any]:
    """A --config JSON file: an object of sections (checked key by key when merged)."""
    try:
        file_cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    if not isinstance(file_cfg, dict):
        raise ConfigError(f"config file {path}: expected a JSON object with sections {list(SECTIONS)}")
    return file_cfg


def _table_cell(
    dataset: str | None, loss: str | None, mixup: str | None, file_cfg: dict[str, Any]
) -> tuple[str, str, str]:
    """The (dataset, loss, mixup) preset cell: flags, else the config file, else the defaults; each checked."""
    dataset = dataset or file_cfg.get("data", {}).get("dataset")
    if not dataset:
        raise ConfigError(f"pass --dataset ({dataset_choices()})")
    loss = loss or file_cfg.get("loss", {}).get("name") or catalog.DEFAULT_LOSS
    mixup = mixup or file_cfg.get("mixup", {}).get("level") or levels.DEFAULT_LEVEL
    for what, key, value in (
        ("dataset", "data.dataset", dataset),
        ("loss", "loss.name", loss),
        ("mixup", "mixup.level", mixup),
    ):
        if value not in CHOICES[key]:
            raise ConfigError(f"--{what} {value!r} is not one of {', '.join(CHOICES[key])}")
    return dataset, loss, mixup


def _merge(base: RawConfig, update: dict[str, Any], where: str) -> RawConfig:
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


def _apply_sets(raw_cfg: RawConfig, sets: list[str]) -> RawConfig:
    """Apply each --set SECTION.KEY=VALUE, coerced to the type of the setting it replaces."""
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


def _check_choices(raw_cfg: RawConfig) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        if raw_cfg[section][name] not in allowed:
            raise ConfigError(f"{key}={raw_cfg[section][name]!r} is not one of {', '.join(allowed)}")


def _derive_resize(
    raw: RawConfig, base: RawConfig, file_cfg: dict[str, Any], flags: dict[str, dict[str, Any]], sets: list[str]
) -> None:
    """A new --image-size without a resize of its own brings the paper's 256/224 test-time resize along
    (--image-size 64 -> resize 73), instead of keeping the preset's, which would feed the model the
    central quarter of each test image."""
    given = (
        flags.get("data", {}).get("resize_size") is not None
        or "resize_size" in (file_cfg.get("data") or {})
        or any(item.partition("=")[0].strip() == "data.resize_size" for item in sets)
    )
    if not given and raw["data"]["image_size"] != base["data"]["image_size"]:
        raw["data"]["resize_size"] = default_resize_size(int(raw["data"]["image_size"]))
