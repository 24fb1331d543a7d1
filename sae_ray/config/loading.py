"""Sweep YAML + dotted overrides -> one validated `Config`, with errors as one line naming
the dotted field, local paths anchored where the sweep is launched, and a trial's config
from its sampled parameters."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sae_ray import storage
from sae_ray.config.base import ConfigError
from sae_ray.config.schema import Config


def one_line(err: ValidationError, spell: Callable[[str], str] = str) -> str:
    """The first error as `field: what`, the field spelt by `spell` (the dotted YAML key by
    default; train-sae spells it as its flag). The one place pydantic errors become lines."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "greater_than_equal":
        msg = f"must be at least {first['ctx']['ge']}"
    head, colon, rest = msg.partition(": ")
    if colon and " " not in head:  # a model-level check names its field first ("k: ...")
        field, msg = ".".join(p for p in (field, head) if p), rest
    return f"{spell(field or 'config')}: {msg}"


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set tree['a']['b'] from 'a.b', creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'sae.k=16' -> ('sae.k', 16): the value is read as YAML so types come out right."""
    if "=" not in text:
        raise ConfigError(f"{text}: an override must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or not all(key.split(".")):
        raise ConfigError(f"{text}: an override needs a key before '=' (section.key=value)")
    try:
        return key, yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{text}: the value is not valid YAML ({problem})") from None


def validate(raw: dict[str, Any]) -> Config:
    try:
        config = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(one_line(err)) from None
    _check_space(config)
    return config


# The sweep's own settings: where it writes, how it searches, what it runs on.
UNSEARCHABLE = (
    "experiment.name",
    "experiment.storage_path",
    "experiment.shared_filesystem",
    "experiment.share_artifacts",
)
UNSEARCHABLE_SECTIONS = ("search", "resources", "wandb")


def _check_searchable(config: Config) -> None:
    """A searched key must be one a trial can vary, and a `when` must be reachable."""
    space = config.search.space
    for dotted, entry in space.items():
        if dotted in UNSEARCHABLE or dotted.split(".")[0] in UNSEARCHABLE_SECTIONS:
            raise ConfigError(
                f"search.space.{dotted}: cannot be searched (a setting of the whole sweep)"
            )
        for parent, wanted in (entry.when or {}).items():
            if parent not in space or parent == dotted:
                raise ConfigError(
                    f"search.space.{dotted}.when: {parent} is not another searched parameter"
                )
            for value in wanted if isinstance(wanted, list) else [wanted]:
                if not space[parent].contains(value):
                    raise ConfigError(
                        f"search.space.{dotted}.when: {parent}={value!r} is never sampled"
                    )


def _check_space(config: Config) -> None:
    """Every searched path must exist and every value it can take must validate."""
    _check_searchable(config)
    base = config.model_dump()
    for dotted, entry in config.search.space.items():
        candidates = entry.values if entry.type == "choice" else [entry.low, entry.high]
        if entry.type in ("int", "intlog"):
            candidates = [int(c) for c in candidates]
        for value in candidates:
            trial = copy.deepcopy(base)
            try:
                for parent, wanted in (entry.when or {}).items():  # as it is sampled
                    _assign_existing(
                        trial, parent, wanted[0] if isinstance(wanted, list) else wanted
                    )
                _assign_existing(trial, dotted, value)
                Config.model_validate(trial)
            except ValidationError as err:
                raise ConfigError(f"search.space.{dotted}: {one_line(err)}") from None
            except KeyError:
                raise ConfigError(f"search.space.{dotted}: no such parameter") from None
    for i, point in enumerate(config.search.points_to_evaluate):
        unknown = set(point) - set(config.search.space)
        if unknown:
            raise ConfigError(
                f"search.points_to_evaluate.{i}: {sorted(unknown)[0]} is not searched"
            )
        for dotted, value in point.items():
            if not config.search.space[dotted].contains(value):
                raise ConfigError(
                    f"search.points_to_evaluate.{i}: {dotted}={value!r} is outside its space"
                )


def _assign_existing(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node[part]
        if not isinstance(node, dict):
            raise KeyError(dotted)
    if leaf not in node or not parents:
        raise KeyError(dotted)
    node[leaf] = value


def local_path_or_name(name: str, base: Path) -> str:
    """`name` made absolute against `base` when it names an existing file or folder there;
    else unchanged: a hub id, a preset, or a missing path that preflight reports as typed."""
    path = base / Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def anchor_paths(config: Config, base: Path | None = None) -> Config:
    """The config with its local paths made absolute against the launching directory.

    Done once, in the driver, before any trial, Train worker or job sees the config: Tune
    runs every trial in a working directory of its own, where './runs' would mean a
    different folder per trial (nothing shared, results left in Ray's temp folder)."""
    base = (base or Path.cwd()).resolve()
    tree = config.model_dump()
    if not storage.is_remote(config.experiment.storage_path):
        path = Path(config.experiment.storage_path).expanduser()
        tree["experiment"]["storage_path"] = str((base / path).resolve())
    if config.cycles.start_from not in ("finetune", "pretrained"):
        tree["cycles"]["start_from"] = local_path_or_name(config.cycles.start_from, base)
    for section in ("model", "dataset"):
        tree[section]["name"] = local_path_or_name(tree[section]["name"], base)
    return Config.model_validate(tree)


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """The sweep file with its overrides, validated, local paths anchored to the current
    directory (see `anchor_paths`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such sweep file")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for text in overrides or []:
        set_dotted(raw, *parse_override(text))
    return anchor_paths(validate(raw))


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the
    last silently: a sweep would run a value its author overrode by accident)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping
)


def read_yaml(path: Path) -> Any:
    """A YAML file's contents, or one line naming the file and what is wrong with it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (is it a YAML file?)") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: binary data, not a YAML file")
    try:
        return yaml.load(text, Loader=_StrictLoader) or {}  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where} ({problem})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a sweep file") from None


def get_dotted(config: Config, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def apply_params(config: Config, params: dict[str, Any]) -> Config:
    """A trial's config: the sweep's config with the sampled dotted parameters set. The
    space was checked with the sweep (its entries checked as sampled: a trial's conditional
    value would fail the check of its parent's other values)."""
    tree = config.model_dump()
    for dotted, value in params.items():
        _assign_existing(tree, dotted, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(one_line(err)) from None
