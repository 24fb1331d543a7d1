"""The stages of a cycle, run by every rank of the trial's Train run: the models (cycle 0
and each retraining), the activations, the SAE and the sharpened targets.

Each stage's output is an artifact keyed by what determines it, so trials that share a
prefix (e.g. every trial's cycle-0 model) compute it once, and a restarted worker group
skips every stage it finished. `ranks.shared_artifact` decides who builds what.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_ray import telemetry
from sae_ray.config import CONTROL, Config, ConfigError
from sae_ray.distributed import sharding
from sae_ray.distributed.ranks import (
    gather,
    local_part,
    rank_world,
    shared_artifact,
)
from sae_ray.distributed.trainer import worker_device as device
from sae_ray.lm.batching import packed
from sae_ray.lm.extraction import (
    extract,
    load_sequences,
    merge_manifests,
    read_manifest,
    write_manifest,
)
from sae_ray.lm.models import Classifier, load_classifier, save_classifier
from sae_ray.lm.text_data import TextData, load_text_data
from sae_ray.method.cpt import LmAux, aux_spec, build_aux
from sae_ray.method.finetune import HISTORY, finetune, initial_classifier
from sae_ray.method.seeds import stream
from sae_ray.method.targets import TARGET_STATS, TARGETS, TargetTable, sharpen
from sae_ray.sae.model import SparseAutoencoder
from sae_ray.storage.artifacts import Artifact, ArtifactStore

EXTRACT_BATCH = 64  # a rank's slice starts on a batch boundary: the same batches as one rank
SPLITS = ("train", "validation", "test")


@dataclass
class Trial:
    """What every stage of a trial's cycles reads: its config, data and artifact store, the
    effective strategy, and where its SAE fits keep their checkpoints."""

    cfg: Config
    data: TextData
    store: ArtifactStore
    train_runs: str
    strategy: str
    # the sweep's points known ahead (a grid, points_to_evaluate): whose SAEs this trial's
    # fits may co-train (`cofit.py`)
    plan: list[dict[str, Any]] = field(default_factory=list)
    # `search.seeds_vary: sae`: the seed of this chain's SAEs alone (else the experiment's)
    sae_only_seed: int | None = None

    @property
    def seed(self) -> int:
        return self.cfg.experiment.seed

    @property
    def sae_seed(self) -> int:
        """The seed its SAEs' initialisations stream from."""
        return self.seed if self.sae_only_seed is None else self.sae_only_seed

    def seeds(self) -> list[int]:
        """The seeds a point runs under (`search.seeds`)."""
        return [self.seed + i for i in range(self.cfg.search.seeds)]

    def seeded(self, seed: int) -> Trial:
        """The trial under one of its seeds: the whole experiment's, or (`search.seeds_vary:
        sae`) its SAEs' alone."""
        if self.cfg.search.seeds_vary == "sae":
            return replace(self, sae_only_seed=seed)
        return self.with_seed(seed)

    def with_seed(self, seed: int) -> Trial:
        """The trial under experiment seed `seed`: its data split too, when the split
        follows the seed (`dataset.split_seed: per_seed`)."""
        experiment = self.cfg.experiment.model_copy(update={"seed": seed})
        cfg = self.cfg.model_copy(update={"experiment": experiment})
        data = self.data
        split = cfg.dataset.split_for(seed)
        if split != self.cfg.dataset.split_for(self.seed):
            data = load_text_data(cfg.dataset, split, documents=cfg.is_lm)
        return replace(self, cfg=cfg, data=data)

    def as_control(self) -> Trial:
        """The same trial at λ = 0: its models are the control trial's (shared artifacts)."""
        return replace(self, strategy=CONTROL)


def model_spec(cfg: Config) -> dict[str, Any]:
    """What determines the cycle-0 model (the hooked layer does not: CE alone trains it)."""
    spec: dict[str, Any] = {
        # `task` only where it is not the default: classification keys stay as they were
        "model": cfg.model.model_dump(exclude={"layer"} | (set() if cfg.is_lm else {"task"})),
        "dataset": cfg.dataset.model_dump(),
        "seed": cfg.experiment.seed,
        "start_from": cfg.cycles.start_from,
    }
    if cfg.cycles.start_from == "finetune":
        spec["train"] = cfg.cycles.model_dump(  # cycle 0 trains without the aux term
            exclude={"count", "aux_weight", "aux_loss", "aux_center", "train_layers", "start_from"}
        )
        spec["select"] = "best_val_perplexity" if cfg.is_lm else "best_val_accuracy"
        spec["ranks"] = _ranks(cfg)
    elif cfg.cycles.start_from != "pretrained":
        spec["start_from"] = str(Path(cfg.cycles.start_from).expanduser().resolve())
    return spec


def _ranks(cfg: Config) -> dict[str, Any]:
    """How a fine-tune's batches were spread: its result depends on it (per-rank dropout
    streams, reduction order), so its models are keyed on it."""
    return {"workers": cfg.resources.num_workers, "strategy": cfg.resources.strategy}


def cycle0(trial: Trial) -> Artifact:
    cfg = trial.cfg
    everyone = cfg.cycles.start_from == "finetune"  # DDP over the ranks; else rank 0 copies
    return shared_artifact(
        trial.store,
        "model",
        model_spec(cfg),
        lambda out, lead: make_cycle0(cfg, trial.data, Path(out), lead),
        everyone,
    )


def make_cycle0(cfg: Config, data: TextData, out: Path, lead: bool = True) -> None:
    """Fine-tune the pretrained model (the default; DDP when the ranks form a process
    group), or take the pretrained model with its untrained head as is, or copy an already
    fine-tuned classifier. Rank 0 (`lead`) writes it."""
    start, seed = cfg.cycles.start_from, cfg.experiment.seed
    init = {
        "build": {
            "name": cfg.model.name,
            "seed": stream(seed, 0, "init"),
            "max_length": cfg.model.max_length,
            "dtype": cfg.model.dtype,
            "lm": cfg.is_lm,
        }
    }
    if start == "finetune":
        _finetune_stage(cfg, init, data, stream(seed, 0, "finetune"), out, lead)
        return
    if start == "pretrained":
        clf = initial_classifier(init, data)
    else:
        clf = load_classifier(Path(start).expanduser())
        if clf.is_lm != cfg.is_lm:
            raise ConfigError(
                f"cycles.start_from: {start} is {'not ' * cfg.is_lm}a causal LM "
                f"(model.task: {cfg.model.task})"
            )
        if not clf.is_lm and clf.model.config.num_labels != data.num_classes:
            raise ConfigError(
                f"cycles.start_from: {start} has {clf.model.config.num_labels} labels, "
                f"{cfg.dataset.name} has {data.num_classes}"
            )
    save_classifier(clf, out)
    (out / HISTORY).write_text("[]")


def _finetune_stage(
    cfg: Config,
    init: dict[str, Any],
    data: TextData,
    seed: int,
    out: Path,
    lead: bool,
    targets: str | None = None,
    aux_weight: float = 0.0,
    train_layers: str = "all",
    lm_aux: dict[str, Any] | None = None,
) -> None:
    """This rank's part of a fine-tune; rank 0 writes the best-on-validation model and the
    per-epoch history. A restarted worker group starts it again: it is deterministic.
    A causal LM trains on its documents packed into blocks, with `lm_aux`'s online aux."""
    clf = initial_classifier(init, data)  # on the CPU: `finetune` places (or shards) it
    table: TargetTable | LmAux | None = TargetTable.load(targets) if targets else None
    if clf.is_lm:
        data = packed(clf.tokenizer, data, cfg.model.max_length)
        table = build_aux(lm_aux, aux_weight, clf.model.config.hidden_size, cfg.model.max_length)
    if "load" in init:  # dropout's masks: from the cycle's seed, not the process's history
        torch.manual_seed(seed)
    history = finetune(
        clf,
        data.splits["train"],
        cfg.cycles,
        cfg.model.layer,
        cfg.model.max_length,
        seed,
        targets=table,
        aux_weight=aux_weight,
        val=data.splits["validation"],
        train_layers=train_layers,
        strategy=cfg.resources.strategy,
        activation_checkpointing=cfg.resources.activation_checkpointing,
        device=device(),
    )
    weights = sharding.full_state_dict(clf.model) if sharding.is_sharded(clf.model) else None
    if lead:
        save_classifier(clf, out, weights)
        (out / HISTORY).write_text(json.dumps(history, indent=1))


def retrain(trial: Trial, parent: Artifact, targets: Artifact | None, cycle: int) -> Artifact:
    """model_c from model_{c-1}: CE + λ(1 − cos(h, t)), or CE alone for the control, with
    the same epochs and steps either way (equal compute)."""
    cfg, strategy = trial.cfg, trial.strategy
    aux_weight = 0.0 if strategy == CONTROL else cfg.cycles.aux_weight
    # the aux term's form only where there is one (its centre is the targets' own key)
    train = cfg.cycles.model_dump(exclude={"count", "start_from", "aux_loss", "aux_center"})
    train["aux_weight"] = aux_weight
    lm_aux = None
    if cfg.is_lm:
        sae_at = targets.location if targets is not None else None
        lm_aux = aux_spec(cfg, strategy, trial.seed, sae_at, cycle)
    if aux_weight > 0 and (cfg.aux_loss != "cosine" or cfg.is_lm):
        train["aux_loss"] = cfg.aux_loss
    spec = {
        "parent": parent.key,
        "targets": targets.key if targets else None,
        "strategy": strategy,
        "cycle": cycle,
        "train": train,
        "layer": cfg.model.layer,
        "select": "best_val_perplexity" if cfg.is_lm else "best_val_accuracy",
        "ranks": _ranks(cfg),
    }
    if lm_aux is not None:
        spec["aux"] = {k: v for k, v in lm_aux.items() if k != "sae"}

    def compute(out: str, lead: bool) -> None:
        _finetune_stage(
            cfg,
            {"load": parent.location},
            trial.data,
            stream(trial.seed, cycle, "finetune"),
            Path(out),
            lead,
            targets=targets.uri(TARGETS) if targets and not cfg.is_lm else None,
            aux_weight=aux_weight,
            train_layers=cfg.cycles.train_layers,
            lm_aux=lm_aux,
        )

    return shared_artifact(trial.store, "model", spec, compute, everyone=True)


def activations(trial: Trial, clf: Classifier, model: Artifact, layer: int) -> Artifact:
    """The hooked layer's activations of every split (token rows for train and validation,
    sequence rows at the pooled position for all three), each rank extracting a slice."""
    cfg = trial.cfg
    data = packed(clf.tokenizer, trial.data, cfg.model.max_length) if clf.is_lm else trial.data
    exclude = cfg.sae.excluded_ids(clf.tokenizer)

    def make(out: str, lead: bool) -> None:
        started = time.perf_counter()
        rank, world = rank_world()
        local, send = local_part(out)
        parts = {}
        for split in SPLITS:
            rows = slice_rows(len(data.splits[split]), world, rank)
            parts[split] = extract(
                clf,
                data.splits[split],
                layer,
                local / split,
                cfg.model.max_length,
                batch_size=EXTRACT_BATCH,
                dtype=cfg.sae.stored_dtype(cfg.model.dtype),
                tokens=split != "test",
                order=rows,
                part=rank if world > 1 else None,
                exclude=exclude,
            )
        send()
        if world > 1:
            _write_merged(gather(parts), Path(out), lead)
        if lead:
            rows = read_manifest(Path(out) / "train" / "tokens").rows
            rate = rows / (time.perf_counter() - started)
            telemetry.extraction_rows_per_s(cfg.experiment.name, rate)

    spec = {
        "parent": model.key,
        "layer": layer,
        "dtype": cfg.sae.stored_dtype(cfg.model.dtype),
        "format": 3,  # one column per hookpoint; token rows hold their vocabulary ids
        "exclude": exclude,
    }
    return shared_artifact(trial.store, "activations", spec, make, everyone=True)


def slice_rows(n: int, world: int, rank: int) -> np.ndarray:
    """Rank `rank`'s examples: contiguous, whole extraction batches (so the rows and their
    padding are those one process would write), in rank order."""
    batches = -(-n // EXTRACT_BATCH)
    first, last = (batches * rank) // world, (batches * (rank + 1)) // world
    return np.arange(first * EXTRACT_BATCH, min(last * EXTRACT_BATCH, n))


def _write_merged(parts: list[dict[str, dict]], out: Path, lead: bool) -> None:
    """Rank 0 writes each table's manifest over every rank's shards."""
    if not lead:
        return
    for split in SPLITS:
        for kind in ("tokens", "sequences"):
            tables = [p[split][kind] for p in parts if kind in p[split]]
            if tables:
                (out / split / kind).mkdir(parents=True, exist_ok=True)
                write_manifest(out / split / kind, merge_manifests(tables))


def sharpened_targets(
    trial: Trial, sae_art: Artifact, acts: Artifact, hp: str, cycle: int
) -> Artifact:
    """Cycle `cycle`'s sharpened targets, one per training example id, built by rank 0.

    `random` and `centroid` never read the SAE, so their targets hang off the activations."""
    cfg, strategy = trial.cfg, trial.strategy
    rule = cfg.sharpening
    spec: dict[str, Any] = {"strategy": strategy, "hookpoint": hp}
    if strategy == "random":
        spec.update(parent=acts.key, seed=stream(trial.seed, cycle, "random_targets"))
    elif strategy == "centroid":
        spec.update(parent=acts.key)
    else:
        spec.update(parent=sae_art.key, keep=rule.model_dump(include={"keep_frac", "top_k_pct"}))
        if strategy == "shuffled":
            spec.update(of=cfg.shuffle_base, seed=stream(trial.seed, cycle, "shuffle"))
    centered = cfg.aux_loss == "cosine" and cfg.cycles.aux_center
    if centered:  # the table carries its centre (random targets move about it)
        spec["center"] = "train_mean"

    def compute(out: str, lead: bool) -> None:
        ids, labels, x = load_sequences(acts.local("train", "sequences"), hp)
        sae_model = None if spec["parent"] == acts.key else _load_sae(sae_art)
        made = sharpen(
            strategy,
            sae_model,
            ids,
            labels,
            x,
            trial.data.num_classes,
            rule,
            trial.seed,
            cycle,
            shuffle_of=cfg.shuffle_base,
            centered=centered,
        )
        made.table.save(Path(out) / TARGETS)
        (Path(out) / TARGET_STATS).write_text(json.dumps({"kept_latents": made.kept_latents}))

    return shared_artifact(trial.store, "targets", spec, compute, everyone=False)


def _load_sae(sae_art: Artifact) -> SparseAutoencoder:
    return SparseAutoencoder.load(sae_art.local())
