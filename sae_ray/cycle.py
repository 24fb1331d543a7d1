"""One trial: cycles 0..C-1 of fine-tune -> extract -> SAE -> evaluate -> sharpen.

Each stage's output is an artifact keyed by what determines it, so trials that share a
prefix (e.g. every trial's cycle-0 model) compute it once. `report` receives one flat
metrics dict per cycle: Tune's `tune.report` in a sweep, a list's append in `sae-ray run`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_ray.activations import extract, load_sequences, load_tokens, read_manifest
from sae_ray.config import Config
from sae_ray.data import TextData, load_text_data
from sae_ray.evaluate import accuracy, f1_macro, interp_metrics, sae_quality
from sae_ray.finetune import TargetTable, finetune, predict
from sae_ray.models import (
    build_classifier,
    hookpoint,
    load_classifier,
    resolve_layer,
    save_classifier,
)
from sae_ray.sae import SparseAutoencoder, decoder_absorption
from sae_ray.sae_train import SaeTrainConfig, activation_dataset, train_saes
from sae_ray.sharpen import sharpen
from sae_ray.store import ArtifactStore

log = logging.getLogger(__name__)
Report = Callable[[dict[str, Any]], None]


def _model_spec(cfg: Config) -> dict[str, Any]:
    return {
        "model": cfg.model.model_dump(exclude={"layer"}),
        "dataset": cfg.dataset.model_dump(),
        "train": cfg.cycles.model_dump(exclude={"count", "aux_weight"}),
        "seed": cfg.experiment.seed,
        "select": "best_val_accuracy",
    }


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
        init_seed=cfg.experiment.seed + cycle,
        progress=False,
        run_name=f"sae-c{cycle}",
    )


def run_trial(cfg: Config, report: Report) -> None:
    threads = int(os.environ.get("SAE_RAY_TORCH_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    store = ArtifactStore(cfg.sweep_dir / "artifacts")
    data = load_text_data(cfg.dataset, seed=cfg.experiment.seed)
    seed = cfg.experiment.seed
    strategy = _effective_strategy(cfg)

    def make_cycle0(out: Path) -> None:
        clf = build_classifier(
            cfg.model.name, data.num_classes, data.splits["train"].texts, seed, cfg.model.max_length
        )
        _finetune(cfg, data, clf, out, seed)

    model_dir, model_key = store.get_or_compute("model", _model_spec(cfg), make_cycle0)
    targets: TargetTable | None = None
    sae_key = ""
    for cycle in range(cfg.cycles.count):
        if cycle > 0:
            model_dir, model_key = _retrain(
                store, cfg, data, model_dir, model_key, sae_key, targets, strategy, cycle
            )
        clf = load_classifier(model_dir)
        layer = resolve_layer(clf.model, cfg.model.layer)
        hp = hookpoint(clf.model, layer)

        def make_acts(out: Path, clf=clf, layer=layer) -> None:
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

        acts_spec = {
            "parent": model_key,
            "layer": layer,
            "dtype": cfg.sae.activation_dtype,
            "format": 2,  # one column per hookpoint
        }
        acts_dir, acts_key = store.get_or_compute("activations", acts_spec, make_acts)

        sae_spec = {
            "parent": acts_key,
            "sae": cfg.sae.model_dump(),
            "seed": seed + cycle,
            "workers": cfg.resources.num_workers,
        }

        def make_sae(out: Path, acts_dir=acts_dir, cycle=cycle, spec=sae_spec, hp=hp) -> None:
            # The Train run is named after the artifact: deterministic, and distinct per SAE,
            # so a sweep restarted after a crash picks the run up from its last checkpoint.
            run_name = f"sae-{store.key('sae', spec)}"
            tokens_dir = acts_dir / "train" / "tokens"
            result = train_saes(
                *activation_dataset(tokens_dir, [hp]),
                sae_train_config(cfg, hp, read_manifest(tokens_dir).d, cycle),
                cfg.resources,
                storage_path=cfg.sweep_dir / "train_runs",
                train_run_name=run_name,
            )
            result.saes[hp].save(out)
            (out / "train_metrics.json").write_text(json.dumps(result.metrics))

        sae_dir, sae_key = store.get_or_compute("sae", sae_spec, make_sae)
        sae = SparseAutoencoder.load(sae_dir)
        train_stats = json.loads((sae_dir / "train_metrics.json").read_text())

        metrics = _evaluate(cfg, data, clf, sae, acts_dir, hp)
        metrics.update(
            {"cycle": cycle, "strategy_effective": strategy, "is_control": strategy == "none"}
        )
        if "tokens_per_s" in train_stats:
            metrics["sae/train_tokens_per_s"] = train_stats["tokens_per_s"]
        if cycle + 1 < cfg.cycles.count and strategy != "none":
            ids, labels, x = load_sequences(acts_dir / "train" / "sequences", hp)
            targets = sharpen(
                strategy,
                sae,
                ids,
                labels,
                x,
                data.num_classes,
                cfg.sharpening.top_k_pct,
                seed=seed + cycle,
            )
        report(metrics)


def _finetune(
    cfg: Config,
    data: TextData,
    clf,
    out: Path,
    seed: int,
    targets: TargetTable | None = None,
    aux_weight: float = 0.0,
) -> None:
    """Train on train, keep the best epoch on validation, save to `out`."""
    finetune(
        clf,
        data.splits["train"],
        cfg.cycles,
        cfg.model.layer,
        cfg.model.max_length,
        seed,
        targets=targets,
        aux_weight=aux_weight,
        val=data.splits["validation"],
    )
    save_classifier(clf, out)


def _retrain(
    store: ArtifactStore,
    cfg: Config,
    data: TextData,
    parent_dir: Path,
    parent_key: str,
    sae_key: str,
    targets: TargetTable | None,
    strategy: str,
    cycle: int,
) -> tuple[Path, str]:
    """model_c from model_{c-1}: CE + λ(1 − cos(h, t)), or CE alone for the control."""
    spec = {
        "parent": parent_key,
        "strategy": strategy,
        "cycle": cycle,
        "train": cfg.cycles.model_dump(exclude={"count"}),
        "layer": cfg.model.layer,
        "select": "best_val_accuracy",
    }
    if strategy in ("per_class", "per_class_complement", "per_example"):
        spec.update(sae=sae_key, top_k_pct=cfg.sharpening.top_k_pct)
    if strategy == "none":
        spec["train"]["aux_weight"] = 0.0

    def compute(out: Path) -> None:
        aux_weight = 0.0 if strategy == "none" else cfg.cycles.aux_weight
        clf = load_classifier(parent_dir)
        _finetune(cfg, data, clf, out, cfg.experiment.seed + cycle, targets, aux_weight)

    return store.get_or_compute("model", spec, compute)


def _evaluate(
    cfg: Config, data: TextData, clf, sae: SparseAutoencoder, acts_dir: Path, hp: str
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
    quality = sae_quality(sae, load_tokens(acts_dir / "validation" / "tokens", hp))
    out.update({f"sae/{k}": v for k, v in quality.items()})
    out["sae/absorption"] = decoder_absorption(sae.W_dec.detach())

    def codes_of(x: np.ndarray) -> np.ndarray:
        return sae.dense_codes(torch.from_numpy(x)).detach().numpy()

    _, y_train, x_train = load_sequences(acts_dir / "train" / "sequences", hp)
    train = {"interp": (codes_of(x_train), y_train), "base": (x_train, y_train)}
    seed = cfg.experiment.seed
    for split, head in (("validation", ""), ("test", "test/")):
        _, labels, x = load_sequences(acts_dir / split / "sequences", hp)
        for kind, rep in (("interp", codes_of(x)), ("base", x)):
            metrics = interp_metrics(
                train[kind], (rep, labels), data.num_classes, seed=seed, dense=kind == "base"
            )
            out.update({f"{head}{kind}/{k}": v for k, v in metrics.items()})
    return {k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in out.items()}
