"""One trial: cycles 0..C-1 of fine-tune -> extract -> SAE -> evaluate -> sharpen.

Each stage's output is an artifact keyed by what determines it, so trials that share a
prefix (e.g. every trial's cycle-0 model) compute it once. `report` receives one flat
metrics dict per cycle: Tune's `tune.report` in a sweep, a list's append in `sae-ray run`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_ray import telemetry
from sae_ray.config import CONTROL, Config, ConfigError
from sae_ray.lm.extraction import extract, load_sequences, load_tokens, read_manifest
from sae_ray.lm.models import hookpoint, load_classifier, resolve_layer, save_classifier
from sae_ray.lm.text_data import TextData, load_text_data
from sae_ray.method.evaluate import accuracy, f1_macro, interp_metrics, sae_quality
from sae_ray.method.finetune import (
    HISTORY,
    best_epoch,
    finetune_on_ray,
    initial_classifier,
    predict,
)
from sae_ray.method.targets import sharpen
from sae_ray.sae.feeds import activation_dataset
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.model import SparseAutoencoder, decoder_absorption
from sae_ray.sae.trainer import train_saes
from sae_ray.storage.artifacts import Artifact, ArtifactStore

log = logging.getLogger(__name__)
TARGETS = "targets.safetensors"
Report = Callable[[dict[str, Any]], None]


def _model_spec(cfg: Config) -> dict[str, Any]:
    """What determines the cycle-0 model (the hooked layer does not: CE alone trains it)."""
    spec: dict[str, Any] = {
        "model": cfg.model.model_dump(exclude={"layer"}),
        "dataset": cfg.dataset.model_dump(),
        "seed": cfg.experiment.seed,
        "start_from": cfg.cycles.start_from,
    }
    if cfg.cycles.start_from == "finetune":
        spec["train"] = cfg.cycles.model_dump(
            exclude={"count", "aux_weight", "train_layers", "start_from"}
        )
        spec["select"] = "best_val_accuracy"
    elif cfg.cycles.start_from != "pretrained":
        spec["start_from"] = str(Path(cfg.cycles.start_from).expanduser().resolve())
    return spec


def sae_train_config(cfg: Config, hp: str, d_in: int, cycle: int) -> SaeTrainConfig:
    """The sweep's `sae` section is the trainer's config; the fit adds where it runs."""
    return SaeTrainConfig(
        **cfg.sae.model_dump(),
        hookpoints=[hp],
        d_in=d_in,
        init_seed=cfg.experiment.seed + cycle,
        progress=False,  # Tune reports
        run_name=f"sae-c{cycle}",
        sweep=cfg.experiment.name,
    )


@dataclass
class Trial:
    """What every stage of a trial's cycles reads: its config, data and artifact store, the
    effective strategy, and where its SAE Train runs go."""

    cfg: Config
    data: TextData
    store: ArtifactStore
    train_runs: str  # where its fine-tunes' and SAE fits' Ray Train runs go
    strategy: str

    @property
    def seed(self) -> int:
        return self.cfg.experiment.seed


def run_trial(cfg: Config, report: Report, trial_id: str = "run") -> None:
    threads = int(os.environ.get("SAE_RAY_TORCH_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    root, train_runs = cfg.trial_dirs(trial_id)
    data = load_text_data(cfg.dataset, seed=cfg.experiment.seed)
    trial = Trial(cfg, data, ArtifactStore(root), train_runs, cfg.strategy)
    # what each stage of a cycle took (computing, waiting on another trial, or loading) and
    # how many artifacts this trial computed: where a sweep's time goes, and what sharing saved
    times: dict[str, float] = {}
    computed = trial.store.computed
    with _timed(times, "model"):
        model = trial.store.get_or_compute(
            "model", _model_spec(cfg), lambda out: _make_cycle0(cfg, data, out, train_runs)
        )
    targets: Artifact | None = None
    for cycle in range(cfg.cycles.count):
        if cycle > 0:
            with _timed(times, "model"):
                model = _retrain(trial, model, targets, cycle)
        metrics, targets = _cycle(trial, model, cycle, times)
        metrics.update(times, **{"artifacts/computed": trial.store.computed - computed})
        times, computed = {}, trial.store.computed
        report(metrics)


def _cycle(
    trial: Trial, model: Artifact, cycle: int, times: dict[str, float]
) -> tuple[dict[str, Any], Artifact | None]:
    """Cycle `cycle` from its model on: activations, SAE, evaluation, and the targets that
    train the next cycle's model (none after the last cycle, or for the control)."""
    cfg = trial.cfg
    clf = load_classifier(model.local())
    layer = resolve_layer(clf.model, cfg.model.layer)
    hp = hookpoint(clf.model, layer)
    with _timed(times, "activations"):
        acts = _activations(trial, clf, model, layer)
    with _timed(times, "sae"):
        sae_art = _sae(trial, acts, hp, cycle)
        sae = SparseAutoencoder.load(sae_art.local())
        train_stats = json.loads((sae_art.local() / "train_metrics.json").read_text())
    with _timed(times, "evaluate"):
        metrics = _evaluate(cfg, trial.data, clf, sae, acts, hp)
    metrics.update(
        {
            "cycle": cycle,
            "strategy_effective": trial.strategy,
            "is_control": trial.strategy == CONTROL,
        }
    )
    if "tokens_per_s" in train_stats:
        metrics["sae/train_tokens_per_s"] = train_stats["tokens_per_s"]
    metrics.update(_finetune_stats(model.local()))
    targets = None
    if cycle + 1 < cfg.cycles.count and trial.strategy != CONTROL:
        with _timed(times, "targets"):
            targets = _targets(trial, sae_art, acts, hp, cycle)
    return metrics, targets


def _activations(trial: Trial, clf, model: Artifact, layer: int) -> Artifact:
    """The hooked layer's activations of every split (token rows for train and validation,
    sequence rows at the pooled position for all three)."""
    cfg = trial.cfg

    def make(out: Path) -> None:
        started = time.perf_counter()
        for split in ("train", "validation", "test"):
            extract(
                clf,
                trial.data.splits[split],
                layer,
                out / split,
                cfg.model.max_length,
                dtype=cfg.sae.activation_dtype,
                tokens=split != "test",
            )
        rows = read_manifest(out / "train" / "tokens").rows
        telemetry.extraction_rows_per_s(cfg.experiment.name, rows / (time.perf_counter() - started))

    spec = {
        "parent": model.key,
        "layer": layer,
        "dtype": cfg.sae.activation_dtype,
        "format": 2,  # one column per hookpoint
    }
    return trial.store.get_or_compute("activations", spec, make)


def _sae(trial: Trial, acts: Artifact, hp: str, cycle: int) -> Artifact:
    """The cycle's SAE, fitted on the train token rows by a Ray Train run."""
    cfg, store = trial.cfg, trial.store
    spec = {
        "parent": acts.key,
        "sae": cfg.sae.model_dump(exclude={"save_every", "num_latents"}),
        "seed": trial.seed + cycle,
        "workers": cfg.resources.num_workers,
    }
    if cfg.sae.num_latents is not None:  # keys of sweeps without it stay as they were
        spec["sae"]["num_latents"] = cfg.sae.num_latents

    def make(out: Path) -> None:
        # The Train run is named after the artifact: deterministic, and distinct per SAE,
        # so a sweep restarted after a crash picks the run up from its last checkpoint.
        tokens = acts.uri("train", "tokens")
        result = train_saes(
            *activation_dataset(tokens, [hp]),
            sae_train_config(cfg, hp, read_manifest(tokens).d, cycle),
            cfg.resources,
            storage_path=trial.train_runs,
            train_run_name=f"sae-{store.key('sae', spec)}",
        )
        result.saes[hp].save(out)
        (out / "train_metrics.json").write_text(json.dumps(result.metrics))
        # The workers report it live, but a short fit ends before their last export.
        telemetry.sae_tokens_per_s(cfg.experiment.name, hp, result.metrics["tokens_per_s"])

    return store.get_or_compute("sae", spec, make)


@contextlib.contextmanager
def _timed(times: dict[str, float], stage: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        times[f"time/{stage}_s"] = time.perf_counter() - started


def _make_cycle0(cfg: Config, data: TextData, out: Path, train_runs: str) -> None:
    """Fine-tune the pretrained model on Ray Train (the default), or take the pretrained model
    with its untrained head as is, or copy an already fine-tuned classifier."""
    start = cfg.cycles.start_from
    seed = cfg.experiment.seed
    init = {
        "build": {
            "name": cfg.model.name,
            "seed": seed,
            "max_length": cfg.model.max_length,
            "dtype": cfg.model.dtype,
        }
    }
    if start == "finetune":
        finetune_on_ray(
            init,
            data,
            cfg.cycles,
            cfg.model.layer,
            cfg.model.max_length,
            seed,
            out,
            cfg.resources,
            train_runs,
        )
        return
    if start == "pretrained":
        clf = initial_classifier(init, data)
    else:
        clf = load_classifier(Path(start).expanduser())
        if clf.model.config.num_labels != data.num_classes:
            raise ConfigError(
                f"cycles.start_from: {start} has {clf.model.config.num_labels} labels, "
                f"{cfg.dataset.name} has {data.num_classes}"
            )
    save_classifier(clf, out)
    (out / HISTORY).write_text("[]")


def _targets(trial: Trial, sae: Artifact, acts: Artifact, hp: str, cycle: int) -> Artifact:
    """Cycle `cycle`'s sharpened targets, one per training example id, as an artifact.

    `random` never reads the SAE, so its targets hang off the activations alone."""
    cfg, strategy = trial.cfg, trial.strategy
    seed = trial.seed + cycle
    if strategy == "random":
        spec = {"parent": acts.key, "strategy": strategy, "seed": seed, "hookpoint": hp}
    else:
        spec = {
            "parent": sae.key,
            "strategy": strategy,
            "top_k_pct": cfg.sharpening.top_k_pct,
            "hookpoint": hp,
        }

    def compute(out: Path) -> None:
        ids, labels, x = load_sequences(acts.local("train", "sequences"), hp)
        table = sharpen(
            strategy,
            SparseAutoencoder.load(sae.local()),
            ids,
            labels,
            x,
            trial.data.num_classes,
            cfg.sharpening.top_k_pct,
            seed=seed,
        )
        table.save(out / TARGETS)

    return trial.store.get_or_compute("targets", spec, compute)


def _retrain(trial: Trial, parent: Artifact, targets: Artifact | None, cycle: int) -> Artifact:
    """model_c from model_{c-1} on Ray Train: CE + λ(1 − cos(h, t)), or CE alone for the
    control, with the same epochs and steps either way (equal compute)."""
    cfg, strategy = trial.cfg, trial.strategy
    aux_weight = 0.0 if strategy == CONTROL else cfg.cycles.aux_weight
    train = cfg.cycles.model_dump(exclude={"count", "start_from"})
    train["aux_weight"] = aux_weight
    spec = {
        "parent": parent.key,
        "targets": targets.key if targets else None,
        "strategy": strategy,
        "cycle": cycle,
        "train": train,
        "layer": cfg.model.layer,
        "select": "best_val_accuracy",
    }

    def compute(out: Path) -> None:
        finetune_on_ray(
            {"load": parent.location},
            trial.data,
            cfg.cycles,
            cfg.model.layer,
            cfg.model.max_length,
            trial.seed + cycle,
            out,
            cfg.resources,
            trial.train_runs,
            targets=targets.uri(TARGETS) if targets else None,
            aux_weight=aux_weight,
            train_layers=cfg.cycles.train_layers,
        )

    return trial.store.get_or_compute("model", spec, compute)


def _finetune_stats(model_dir: Path) -> dict[str, float]:
    """How the cycle's model was trained: steps (equal across strategies and the control),
    the epoch validation chose, and that epoch's training losses."""
    history = json.loads((model_dir / HISTORY).read_text())
    if not history:
        return {"finetune/steps": 0.0}
    best = best_epoch(history)
    out = {"finetune/steps": float(history[-1]["steps"]), "finetune/best_epoch": best["epoch"]}
    out.update({f"finetune/{k}": best[k] for k in ("ce", "aux") if k in best})
    return out


def _evaluate(
    cfg: Config, data: TextData, clf, sae: SparseAutoencoder, acts: Artifact, hp: str
) -> dict[str, Any]:
    """Selection metrics on validation; the held-out test split is reported, never selected on.

    `interp/...` read the SAE codes at the pooled position, `base/...` the same dense
    activations without the SAE (what the SAE adds, or loses, is the difference)."""
    out: dict[str, Any] = {}
    for split, prefix in (("validation", "val"), ("test", "test")):
        preds = predict(clf, data.splits[split], cfg.model.max_length)
        labels = data.splits[split].labels
        out[f"{prefix}/accuracy"] = accuracy(preds, labels)
        out[f"{prefix}/f1_macro"] = f1_macro(preds, labels, data.num_classes)
    quality = sae_quality(sae, load_tokens(acts.local("validation") / "tokens", hp))
    out.update({f"sae/{k}": v for k, v in quality.items()})
    out["sae/absorption"] = decoder_absorption(sae.W_dec.detach())

    def codes_of(x: np.ndarray) -> np.ndarray:
        return sae.dense_codes(torch.from_numpy(x)).detach().numpy()

    _, y_train, x_train = load_sequences(acts.local("train", "sequences"), hp)
    train = {"interp": (codes_of(x_train), y_train), "base": (x_train, y_train)}
    seed = cfg.experiment.seed
    for split, head in (("validation", ""), ("test", "test/")):
        _, labels, x = load_sequences(acts.local(split) / "sequences", hp)
        for kind, rep in (("interp", codes_of(x)), ("base", x)):
            metrics = interp_metrics(
                train[kind], (rep, labels), data.num_classes, seed=seed, dense=kind == "base"
            )
            out.update({f"{head}{kind}/{k}": v for k, v in metrics.items()})
    return {k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in out.items()}
