"""Sweep YAML -> one validated, typed config.

Every section forbids unknown keys so a typo fails loudly instead of silently running the
default. Errors are reduced to one line naming the dotted field, because a researcher
editing YAML needs "sae.k: ..." and not a pydantic traceback.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sae_ray import storage


class ConfigError(ValueError):
    """A user-facing config problem; the message is one line that names the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Experiment(Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    storage_path: str = Field(
        "./runs",
        min_length=1,
        description="local directory (relative: to where the sweep is launched), or "
        "s3://bucket/prefix, gs://bucket/prefix",
    )
    seed: int = 0
    share_artifacts: bool = Field(
        True,
        description="false: each trial computes every stage itself (for measuring what "
        "sharing saves; benchmarks/sweep_sharing.py)",
    )

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, value: str) -> str:
        return storage.check(value)


class Model(Section):
    name: str = Field(
        "tiny-gpt2", description="hub id, local path, or a preset (see models.MODEL_PRESETS)"
    )
    layer: int = Field(-1, description="hooked block index; negative counts from the end")
    max_length: int = Field(64, ge=4)
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="weights as loaded (bfloat16 halves a large model's memory)"
    )


class Dataset(Section):
    name: str = "synthetic:topics"
    text_column: str = "text"
    label_column: str = "label"
    num_examples: int = Field(2000, ge=40, description="size of the synthetic task")
    max_examples: int | None = Field(None, ge=10, description="cap on the loaded train split")
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)


class Cycles(Section):
    """The classifier's training: the seed's recipe (AdamW 1e-4, weight decay 0.01, 100
    warm-up steps then linear decay, gradient clip 1.0) as defaults."""

    count: int = Field(2, ge=1)
    epochs: int = Field(1, ge=1, description="epochs of every fine-tune (equal compute)")
    aux_weight: float = Field(0.1, ge=0, description="λ in CE + λ(1 − cos(h, t))")
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, ge=1, description="examples per step, over all workers")
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(100, ge=0, description="linear warm-up, then linear decay to 0")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    start_from: str = Field(
        "finetune",
        min_length=1,
        description="cycle 0: 'finetune' the pretrained model, 'pretrained' (untrained "
        "head, no training), or the path of an already fine-tuned classifier",
    )
    train_layers: Literal["all", "from_hooked"] = Field(
        "all",
        description="what retraining (cycle > 0) updates: everything, or the hooked "
        "block, the blocks above it and the head",
    )
    autocast: bool = Field(True, description="bf16 autocast when the workers have a GPU")

    @field_validator("start_from")
    @classmethod
    def _known_start(cls, value: str) -> str:
        if value not in ("finetune", "pretrained") and not Path(value).expanduser().is_dir():
            raise ValueError(f"{value!r} is neither 'finetune', 'pretrained' nor a model directory")
        return value


class Sae(Section):
    k: int = Field(32, ge=1)
    expansion_factor: int = Field(8, ge=1)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(1024, ge=1, description="tokens per SAE step, all workers")
    lr: float | None = Field(None, gt=0, description="default scales with 1/sqrt(latents)")
    auxk_alpha: float = Field(1 / 32, ge=0)
    dead_tokens: int = Field(100_000, ge=1, description="window over which firing is counted")
    dead_percentage_threshold: float = Field(
        0.0, ge=0, le=1, description="dead: fires on fewer than this fraction of the window"
    )
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    grad_acc_steps: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="global token budget; else epochs")
    activation_dtype: Literal["float32", "float16"] = "float32"
    save_every: int = Field(
        1000, ge=1, description="SAE steps between checkpoints (a worker fault resumes there)"
    )


class Sharpening(Section):
    strategy: Literal["per_class", "per_class_complement", "per_example", "random", "none"] = (
        "per_class"
    )
    top_k_pct: float = Field(10.0, gt=0, le=100)


class SpaceEntry(Section):
    """One searched parameter. `when` makes it conditional: it is sampled only when every
    named parameter has (one of) the given value(s), e.g. top_k_pct only for strategies that
    use it; otherwise the trial keeps the YAML's value."""

    type: Literal["choice", "int", "intlog", "uniform", "loguniform"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    step: int | None = Field(None, ge=1)
    when: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> SpaceEntry:
        if self.type == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty 'values' list")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError(f"{self.type} needs 'low' <= 'high'")
        elif self.type in ("loguniform", "intlog") and self.low <= 0:
            raise ValueError(f"{self.type} needs 'low' > 0")
        elif self.type == "intlog" and self.step not in (None, 1):
            raise ValueError("intlog takes no 'step'")
        return self

    def contains(self, value: Any) -> bool:
        """Whether `value` is one this entry can sample (for hand-given points)."""
        if self.type == "choice":
            return value in self.values
        if self.type in ("int", "intlog") and (isinstance(value, bool) or value != int(value)):
            return False
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def allows(self, params: dict[str, Any]) -> bool:
        """Whether this entry is active given the parameters sampled so far."""
        for dotted, wanted in (self.when or {}).items():
            options = wanted if isinstance(wanted, list) else [wanted]
            if params.get(dotted) not in options:
                return False
        return True


class Objective(Section):
    metric: str = Field(min_length=1)
    mode: Literal["max", "min"] = "max"
    at: Literal["last", "best"] = Field(
        "last", description="the last cycle's value, or the best cycle's"
    )

    @property
    def key(self) -> str:
        """The name the searcher reads: the metric itself, or its running best."""
        return self.metric if self.at == "last" else f"best/{self.metric}"


class Constraint(Section):
    """A feasibility bound on a metric at the last cycle: `min` / `max` absolute bounds, or
    `max_drop` below its cycle-0 value (accuracy may drop at most 0.005 = 0.5 points)."""

    metric: str = Field(min_length=1)
    min: float | None = None
    max: float | None = None
    max_drop: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_bound(self) -> Constraint:
        if self.min is None and self.max is None and self.max_drop is None:
            raise ValueError("a constraint needs 'min', 'max' or 'max_drop'")
        return self


class Search(Section):
    algorithm: Literal["tpe", "random", "grid", "nsga2"] = "tpe"
    num_samples: int = Field(4, ge=1, description="trials (grid: ignored, one per point)")
    metric: str = "interp/u"
    mode: Literal["max", "min"] = "max"
    objectives: list[Objective] = Field(
        default_factory=list, description="several objectives: a Pareto front (overrides metric)"
    )
    constraints: list[Constraint] = Field(default_factory=list)
    scheduler: Literal["none", "asha"] = Field(
        "none", description="ASHA stops weak trials after a cycle (one objective only)"
    )
    grace_cycles: int = Field(1, ge=1, description="ASHA: cycles every trial runs")
    reduction_factor: float = Field(2.0, gt=1)
    space: dict[str, SpaceEntry] = Field(default_factory=dict)
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    max_concurrent_trials: int | None = Field(None, ge=1)
    control: bool = Field(
        True,
        description="run the λ = 0 control (strategy none) as the first trial, at the first "
        "point's other settings, beside the num_samples searched ones",
    )

    @field_validator("objectives")
    @classmethod
    def _distinct(cls, value: list[Objective]) -> list[Objective]:
        names = [o.metric for o in value]
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice:
            raise ValueError(f"{twice!r} is listed twice")
        return value

    @model_validator(mode="after")
    def _check(self) -> Search:
        targets = self.goals()
        if self.scheduler == "asha" and len(targets) > 1:
            raise ValueError("asha stops trials on one objective; drop it or use one objective")
        if self.algorithm == "grid":
            for dotted, entry in self.space.items():
                if entry.type != "choice" and not (entry.type == "int" and entry.step):
                    raise ValueError(f"grid needs choice (or int with step) entries: {dotted}")
        return self

    def goals(self) -> list[Objective]:
        """The objectives: the list, or the single metric/mode."""
        return self.objectives or [Objective(metric=self.metric, mode=self.mode)]


class Resources(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)
    max_failures: int = Field(2, ge=0, description="worker-group restarts of a Train run")
    trial_retries: int = Field(1, ge=0, description="re-runs of a failed trial (artifacts kept)")


class Wandb(Section):
    mode: Literal["offline", "online", "disabled"] = "disabled"
    project: str = "sae-ray"


class Config(Section):
    experiment: Experiment
    model: Model = Field(default_factory=Model)
    dataset: Dataset = Field(default_factory=Dataset)
    cycles: Cycles = Field(default_factory=Cycles)
    sae: Sae = Field(default_factory=Sae)
    sharpening: Sharpening = Field(default_factory=Sharpening)
    search: Search = Field(default_factory=Search)
    resources: Resources = Field(default_factory=Resources)
    wandb: Wandb = Field(default_factory=Wandb)

    @property
    def sweep_uri(self) -> str:
        """Where the sweep keeps everything: an absolute local path or a bucket URI."""
        return storage.join(storage.resolve(self.experiment.storage_path), self.experiment.name)

    @property
    def sweep_dir(self) -> Path:
        """The sweep's directory when it is local (object-store sweeps have none)."""
        if storage.is_remote(self.sweep_uri):
            raise ValueError(f"{self.sweep_uri} is not a local directory")
        return Path(self.sweep_uri)


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{field}: {msg}"


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
    return key.strip(), yaml.safe_load(raw) if raw else ""


def validate(raw: dict[str, Any]) -> Config:
    try:
        config = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None
    _check_space(config)
    return config


def _check_space(config: Config) -> None:
    """Every searched path must exist and every value it can take must validate."""
    base = config.model_dump()
    for dotted, entry in config.search.space.items():
        candidates = entry.values if entry.type == "choice" else [entry.low, entry.high]
        if entry.type in ("int", "intlog"):
            candidates = [int(c) for c in candidates]
        for parent in entry.when or {}:
            if parent not in config.search.space or parent == dotted:
                raise ConfigError(
                    f"search.space.{dotted}.when: {parent} is not another searched parameter"
                )
        for value in candidates:
            trial = copy.deepcopy(base)
            try:
                _assign_existing(trial, dotted, value)
                Config.model_validate(trial)
            except ValidationError as err:
                raise ConfigError(f"search.space.{dotted}: {_one_line(err)}") from None
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
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for text in overrides or []:
        set_dotted(raw, *parse_override(text))
    return anchor_paths(validate(raw))


def get_dotted(config: Config, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def apply_params(config: Config, params: dict[str, Any]) -> Config:
    """A trial's config: the sweep's config with the sampled dotted parameters set."""
    tree = config.model_dump()
    for dotted, value in params.items():
        _assign_existing(tree, dotted, value)
    return validate(tree)
