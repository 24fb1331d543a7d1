"""What can be checked before a sweep starts Ray, so that a typo costs a second, not a
cluster start-up and a failed trial: the storage is writable, the dataset loads with its
columns and labels, and the SAE's k fits its latents. Each failure is a `ConfigError`
naming the field (exit 2). Failures that depend on a trial's sampled values stay trial
failures: the sweep records them and goes on."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sae_ray import storage
from sae_ray.config import Config, ConfigError, apply_params, sharpens

if TYPE_CHECKING:
    from sae_ray.trial.memory import Plan


def check(cfg: Config) -> Plan | None:
    """Every check; returns the memory plan (None when the model's size is unknown)."""
    if cfg.ground_truth:  # no model and no text: SAELens's generator and the SAE's size
        check_ground_truth(cfg)
        check_storage(cfg)
        return None
    examples = check_dataset(cfg)
    check_model(cfg)
    check_layer(cfg)
    check_sae_size(cfg)
    check_sharpening(cfg)
    plan = memory_plan(cfg, examples)
    if plan is not None:
        plan.check()
    check_storage(cfg)
    return plan


def check_cluster(cfg: Config, nodes: list[dict]) -> None:
    """What the joined cluster rules out, before any trial starts: a local storage path on
    several machines (each would write its own disk: results, artifacts and checkpoints
    scattered and lost with the node), and a worker larger than every node. `nodes`:
    `ray.nodes()`, with one node of each type an autoscaler may add (`sweep.cluster`)."""
    alive = [n for n in nodes if n.get("Alive")]
    local = not storage.is_remote(cfg.sweep_uri) and not cfg.experiment.shared_filesystem
    if len(alive) > 1 and local:
        now = sum(not n.get("autoscaled") for n in alive)
        grows = " (more from the autoscaler)" if now < len(alive) else ""
        raise ConfigError(
            f"experiment.storage_path: {cfg.experiment.storage_path} is a local folder and "
            f"this Ray cluster has {now} nodes{grows}, each writing its own disk: use a "
            "bucket (s3://..., gs://...), or experiment.shared_filesystem=true for a "
            "filesystem mounted on every node (NFS, EFS, Lustre)"
        )
    res = cfg.resources
    if any(n.get("Resources") is None for n in alive):  # node types the autoscaler keeps
        return
    largest = max((n.get("Resources", {}).get("CPU", 0.0) for n in alive), default=0.0)
    if res.cpus_per_worker > largest:
        raise ConfigError(
            f"resources.cpus_per_worker: {res.cpus_per_worker:g} CPUs per worker, and no "
            f"node has more than {largest:g}"
        )
    gpus = max((n.get("Resources", {}).get("GPU", 0.0) for n in alive), default=0.0)
    if res.use_gpu and gpus < 1:
        raise ConfigError("resources.use_gpu: no node of this Ray cluster has a GPU")


def _first_missing(location: str) -> str | None:
    """The outermost folder of a local location that does not exist yet (None: all do)."""
    path, missing = Path(location), None
    while not path.exists() and path != path.parent:
        missing, path = path, path.parent
    return str(missing) if missing else None


def check_storage(cfg: Config) -> None:
    """The sweep's folder can be written. A refused command leaves nothing behind, so the
    folders the probe made are removed again (the sweep makes them when it writes)."""
    probe = storage.join(cfg.sweep_uri, ".write-probe")
    made = None if storage.is_remote(probe) else _first_missing(cfg.sweep_uri)
    try:
        storage.write_bytes(probe, b"")
        storage.remove(probe)
    except Exception as err:  # OSError locally, ArrowException / OSError from a bucket
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"experiment.storage_path: {cfg.sweep_uri} is not writable ({reason})"
        ) from None
    finally:
        if made is not None:
            storage.remove(made)


def check_dataset(cfg: Config) -> int:
    """The dataset loads; returns its number of examples (all splits)."""
    from sae_ray.lm.text_data import load_text_data

    data = load_text_data(cfg.dataset, documents=cfg.is_lm)
    return sum(len(split) for split in data.splits.values())


def model_config(model: str):
    from sae_ray.lm.models import config_of

    return config_of(model)


def model_shape(model: str) -> tuple[int, int] | None:
    """The hooked width and the number of blocks (None: unknown offline)."""
    config = model_config(model)
    return None if config is None else (config.hidden_size, config.num_hidden_layers)


def memory_plan(cfg: Config, examples: int) -> Plan | None:
    """Each stage's memory per worker for the largest SAE the sweep may sample."""
    from sae_ray.trial.memory import Shape, plan

    config = model_config(cfg.model.name)
    if config is None:
        return None
    shape = Shape.of(config, lm=cfg.is_lm)
    k = max(searched_values(cfg, "sae.k", cfg.sae.k))
    factor = max(searched_values(cfg, "sae.expansion_factor", cfg.sae.expansion_factor))
    latents = cfg.sae.model_copy(update={"expansion_factor": factor}).latents_for(shape.hidden)
    return plan(cfg, shape, latents, k, examples)


def hidden_size(model: str) -> int | None:
    shape = model_shape(model)
    return None if shape is None else shape[0]


def check_model(cfg: Config) -> None:
    """A model given as a local folder must hold one (a hub id is only known to the hub: a
    trial that cannot load it says so). The same for `cycles.start_from`'s classifier."""
    name = cfg.model.name
    path = Path(name).expanduser()
    if name.startswith(("./", "../", "/", "~")) and not path.exists():
        raise ConfigError(f"model.name: {name}: no such model folder")
    if not path.exists() and not is_model_name(name):
        raise ConfigError(
            f"model.name: {name!r} is neither a preset, a local model folder nor a hub id "
            "(owner/name)"
        )
    if path.is_dir() and model_shape(name) is None:
        raise ConfigError(f"model.name: {name} holds no model (no readable config.json)")
    from sae_ray.lm.models import FIRST_TOKEN_TYPES

    config = model_config(name)
    if cfg.is_lm and config is not None and config.model_type in FIRST_TOKEN_TYPES:
        raise ConfigError(
            f"model.name: {name} is a {config.model_type} encoder, not a causal LM "
            "(model.task: causal_lm)"
        )
    check_positions(cfg, config)
    start = cfg.cycles.start_from
    if start not in ("finetune", "pretrained") and not (Path(start) / "config.json").is_file():
        raise ConfigError(f"cycles.start_from: {start} holds no saved classifier (no config.json)")


def check_positions(cfg: Config, config) -> None:
    """A max_length beyond the model's position embeddings fails in a worker's first
    forward (an index error); the tiny presets are built to fit whatever it is."""
    from sae_ray.lm.models import TINY_PRESETS

    if config is None or cfg.model.name in TINY_PRESETS:
        return
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    longest = max(searched_values(cfg, "model.max_length", cfg.model.max_length))
    if isinstance(limit, int) and longest > limit:
        field = (
            "search.space.model.max_length"
            if "model.max_length" in cfg.search.space
            else ("model.max_length")
        )
        raise ConfigError(
            f"{field}: {longest} tokens is more than {cfg.model.name}'s {limit} positions"
        )


def is_model_name(name: str) -> bool:
    """A preset, or what the hub could hold (its own rule for repository ids)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from sae_ray.lm.models import MODEL_PRESETS, TINY_PRESETS

    if name in (*MODEL_PRESETS, *TINY_PRESETS, "minilm"):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_layer(cfg: Config) -> None:
    """A fixed `model.layer` the model lacks would fail every trial; a searched one fails
    only the trials that sample it, which the sweep records and goes on from."""
    shape = model_shape(cfg.model.name)
    if shape is None or "model.layer" in cfg.search.space:
        return
    blocks, layer = shape[1], cfg.model.layer
    if not -blocks <= layer < blocks:
        raise ConfigError(
            f"model.layer: {layer} is out of range for {cfg.model.name}'s {blocks} blocks "
            f"(0..{blocks - 1}, or -1..-{blocks} from the end)"
        )


def check_ground_truth(cfg: Config) -> None:
    """A ground-truth sweep needs SAELens's synthetic generator (an optional extra)."""
    try:
        import sae_lens.synthetic  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"dataset.name: {cfg.dataset.name} draws from SAELens's synthetic generator, "
            "which is not installed: pip install 'sae-ray[synthsae]'"
        ) from None
    check_sae_size(cfg, cfg.synthetic.hidden_dim, "synthetic.hidden_dim")


def check_sae_size(cfg: Config, d: int | None = None, width: str | None = None) -> None:
    """k must not exceed the latents (expansion_factor x width) for any sampled pair; the
    width is the model's, or `d` (named `width`)."""
    d = d or hidden_size(cfg.model.name)
    if d is None:
        return
    ks = searched_values(cfg, "sae.k", cfg.sae.k)
    factors = searched_values(cfg, "sae.expansion_factor", cfg.sae.expansion_factor)
    k, factor = max(ks), min(factors)
    latents = cfg.sae.model_copy(update={"expansion_factor": factor}).latents_for(d)
    if k > latents:
        field = "search.space.sae.k" if "sae.k" in cfg.search.space else "sae.k"
        raise ConfigError(
            f"{field}: k up to {k} is larger than the {latents} latents of "
            f"expansion_factor {factor} x width {d} ({width or cfg.model.name})"
        )


# What sets a trial's kept count: searched, it is checked per trial (a trial error).
KEEP_KEYS = {
    "sharpening.keep_frac",
    "sharpening.top_k_pct",
    "sae.k",
    "sae.expansion_factor",
    "sae.num_latents",
    "cycles.aux_weight",
    "cycles.count",
}


def check_sharpening(cfg: Config) -> None:
    """A fixed keep count that cannot change the targets (per_example keeping all k), for
    every strategy the sweep may run (the λ = 0 control needs none)."""
    d = hidden_size(cfg.model.name)
    if d is None or KEEP_KEYS & set(cfg.search.space):
        return
    strategy = cfg.search.space.get("sharpening.strategy")
    for value in strategy.values if strategy and strategy.values else [cfg.sharpening.strategy]:
        one = apply_params(cfg, {"sharpening.strategy": value})
        if not sharpens(one):
            continue
        try:
            one.sharpening.check_changes_targets(one.sae.k, one.sae.latents_for(d))
        except ValueError as err:
            raise ConfigError(str(err)) from None


def searched_values(cfg: Config, name: str, fixed: int) -> list[int]:
    entry = cfg.search.space.get(name)
    if entry is None:
        return [fixed]
    if entry.type == "choice":
        return [int(v) for v in entry.values]
    return [int(entry.low), int(entry.high)]
