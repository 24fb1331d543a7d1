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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_ray import storage, telemetry
from sae_ray.activations import extract, load_sequences, load_tokens, read_manifest
from sae_ray.config import Config, ConfigError
from sae_ray.data import TextData, load_text_data
from sae_ray.evaluate import accuracy, f1_macro, interp_metrics, sae_quality
from sae_ray.finetune import HISTORY, best_epoch, finetune_on_ray, initial_classifier, predict
from sae_ray.models import hookpoint, load_classifier, resolve_layer, save_classifier
from sae_ray.sae import SparseAutoencoder, decoder_absorption
from sae_ray.sae_train import SaeTrainConfig, activation_dataset, train_saes
from sae_ray.sharpen import sharpen
from sae_ray.store import Artifact, ArtifactStore

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


def _effective_strategy(cfg: Config) -> str:
    """λ = 0 makes every strategy the 'none' control: they then share one artifact."""
    return "none" if cfg.cycles.aux_weight == 0 else cfg.sharpening.strategy


def sae_train_config(cfg: Config, hp: str, d_in: int, cycle: int) -> SaeTrainConfig:
    """The sweep's `sae` section as the shared trainer's config (quiet: Tune reports)."""
    sae = cfg.sae
    return SaeTrainConfig(
        hookpoints=[hp],
        d_in=d_in,
        k=sae.k,
        expansion_factor=sae.expansion_factor,
        batch_tokens=sae.batch_size,
        grad_acc_steps=sae.grad_acc_steps,
        max_tokens=sae.max_tokens,
        epochs=sae.epochs,
        optimizer=sae.optimizer,
        lr=sae.lr,
        weight_decay=sae.weight_decay,
        auxk_alpha=sae.auxk_alpha,
        dead_window_tokens=sae.dead_tokens,
        dead_percentage_threshold=sae.dead_percentage_threshold,
        save_every=sae.save_every,
        init_seed=cfg.experiment.seed + cycle,
        progress=False,
        run_name=f"sae-c{cycle}",
        sweep=cfg.experiment.name,
    )


def trial_storage(cfg: Config, trial_id: str) -> tuple[str, str]:
    """The trial's artifact store and where its SAE Train runs go: the sweep's, or with
    `share_artifacts: false` its own (nothing found, everything computed; the SAE runs too,
    since they are named by artifact key and a reused run name restores that run)."""
    dirs = [storage.join(cfg.sweep_uri, d) for d in ("artifacts", "train_runs")]
    if not cfg.experiment.share_artifacts:
        dirs = [storage.join(d, "unshared", trial_id) for d in dirs]
    return dirs[0], dirs[1]


def run_trial(cfg: Config, report: Report, trial_id: str = "run") -> None:
    threads = int(os.environ.get("SAE_RAY_TORCH_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    root, sae_runs = trial_storage(cfg, trial_id)
    store = ArtifactStore(root)
    data = load_text_data(cfg.dataset, seed=cfg.experiment.seed)
    seed = cfg.experiment.seed
    strategy = _effective_strategy(cfg)

    # what each stage of a cycle took (computing, waiting on another trial, or loading) and
    # how many artifacts this trial computed: where a sweep's time goes, and what sharing saved
    times: dict[str, float] = {}
    computed = store.computed
    with _timed(times, "model"):
        model = store.get_or_compute(
            "model", _model_spec(cfg), lambda out: _make_cycle0(cfg, data, out)
        )
    targets: Artifact | None = None
    for cycle in range(cfg.cycles.count):
        if cycle > 0:
            with _timed(times, "model"):
                model = _retrain(store, cfg, data, model, targets, strategy, cycle)
        clf = load_classifier(model.local())
        layer = resolve_layer(clf.model, cfg.model.layer)
        hp = hookpoint(clf.model, layer)

        def make_acts(out: Path, clf=clf, layer=layer) -> None:
            started = time.perf_counter()
            for split in ("train", "validation", "test"):
                extract(
                    clf,
                    data.splits[split],
                    layer,
                    out / split,
                    cfg.model.max_length,
                    dtype=cfg.sae.activation_dtype,
                    tokens=split != "test",
                )
            rows = read_manifest(out / "train" / "tokens").rows
            telemetry.extraction_rows_per_s(
                cfg.experiment.name, rows / (time.perf_counter() - started)
            )

        acts_spec = {
            "parent": model.key,
            "layer": layer,
            "dtype": cfg.sae.activation_dtype,
            "format": 2,  # one column per hookpoint
        }
        with _timed(times, "activations"):
            acts = store.get_or_compute("activations", acts_spec, make_acts)

        sae_spec = {
            "parent": acts.key,
            "sae": cfg.sae.model_dump(exclude={"save_every"}),  # how often is not what
            "seed": seed + cycle,
            "workers": cfg.resources.num_workers,
        }

        def make_sae(out: Path, acts=acts, cycle=cycle, spec=sae_spec, hp=hp) -> None:
            # The Train run is named after the artifact: deterministic, and distinct per SAE,
            # so a sweep restarted after a crash picks the run up from its last checkpoint.
            run_name = f"sae-{store.key('sae', spec)}"
            tokens = acts.uri("train", "tokens")
            result = train_saes(
                *activation_dataset(tokens, [hp]),
                sae_train_config(cfg, hp, read_manifest(tokens).d, cycle),
                cfg.resources,
                storage_path=sae_runs,
                train_run_name=run_name,
            )
            result.saes[hp].save(out)
            (out / "train_metrics.json").write_text(json.dumps(result.metrics))
            # The workers report it live, but a short fit ends before their last export.
            telemetry.sae_tokens_per_s(cfg.experiment.name, hp, result.metrics["tokens_per_s"])

        with _timed(times, "sae"):
            sae_art = store.get_or_compute("sae", sae_spec, make_sae)
            sae = SparseAutoencoder.load(sae_art.local())
            train_stats = json.loads((sae_art.local() / "train_metrics.json").read_text())

        with _timed(times, "evaluate"):
            metrics = _evaluate(cfg, data, clf, sae, acts, hp)
        metrics.update(
            {"cycle": cycle, "strategy_effective": strategy, "is_control": strategy == "none"}
        )
        if "tokens_per_s" in train_stats:
            metrics["sae/train_tokens_per_s"] = train_stats["tokens_per_s"]
        metrics.update(_finetune_stats(model.local()))
        if cycle + 1 < cfg.cycles.count and strategy != "none":
            with _timed(times, "targets"):
                targets = _targets(store, cfg, data, strategy, sae_art, acts, hp, cycle)
        metrics.update(times, **{"artifacts/computed": store.computed - computed})
        times, computed = {}, store.computed
        report(metrics)


@contextlib.contextmanager
def _timed(times: dict[str, float], stage: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        times[f"time/{stage}_s"] = time.perf_counter() - started


def _make_cycle0(cfg: Config, data: TextData, out: Path) -> None:
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
            storage.join(cfg.sweep_uri, "train_runs"),
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


def _targets(
    store: ArtifactStore,
    cfg: Config,
    data: TextData,
    strategy: str,
    sae: Artifact,
    acts: Artifact,
    hp: str,
    cycle: int,
) -> Artifact:
    """Cycle `cycle`'s sharpened targets, one per training example id, as an artifact.

    `random` never reads the SAE, so its targets hang off the activations alone."""
    seed = cfg.experiment.seed + cycle
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
            data.num_classes,
            cfg.sharpening.top_k_pct,
            seed=seed,
        )
        table.save(out / TARGETS)

    return store.get_or_compute("targets", spec, compute)


def _retrain(
    store: ArtifactStore,
    cfg: Config,
    data: TextData,
    parent: Artifact,
    targets: Artifact | None,
    strategy: str,
    cycle: int,
) -> Artifact:
    """model_c from model_{c-1} on Ray Train: CE + λ(1 − cos(h, t)), or CE alone for the
    control, with the same epochs and steps either way (equal compute)."""
    aux_weight = 0.0 if strategy == "none" else cfg.cycles.aux_weight
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
            data,
            cfg.cycles,
            cfg.model.layer,
            cfg.model.max_length,
            cfg.experiment.seed + cycle,
            out,
            cfg.resources,
            storage.join(cfg.sweep_uri, "train_runs"),
            targets=targets.uri(TARGETS) if targets else None,
            aux_weight=aux_weight,
            train_layers=cfg.cycles.train_layers,
        )

    return store.get_or_compute("model", spec, compute)


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
