"""Train SAEs with Ray Train workers on the activation shards.

One trainer for everything: `sae-ray train-sae` (several hookpoints at once, the saetrain
flags) and every cycle of a sweep. Driver: `train_saes` runs a `TorchTrainer` with the
feed (`feeds`: the workers read their shares of the shards themselves, or a Ray Dataset
is split across them). Worker: `train_loop` draws its batches, trains one SAE per
hookpoint under DDP, logs, and checkpoints in sparsify's layout.

A step is DDP-exact: every worker's loss is normalised by the union batch's variance and
scaled by the world size, so N workers on b1..bN take the step one worker takes on their
union. Dead latents and the token budget are counted over all workers, in tokens.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint

from sae_ray.config import Resources
from sae_ray.distributed.ranks import rank_world
from sae_ray.distributed.trainer import torch_trainer, worker_device
from sae_ray.sae.checkpoints import (
    STATE,
    Progress,
    load_checkpoint,
    publish,
    save_checkpoint,
    truncate_log,
)
from sae_ray.sae.feeds import ActivationFeed, quiet_ordered_data
from sae_ray.sae.fit import Fit
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.model import SaeConfig, SparseAutoencoder
from sae_ray.sae.run_log import RunLog
from sae_ray.sae.schedule import k_at, lr_factor, set_lr, total_steps, warmed
from sae_ray.sae.spliced import ModelFeed
from sae_ray.sae.training import DeadTracker, make_optimizer, optimizer_step


@dataclass
class SaeTrainResult:
    saes: dict[str, SparseAutoencoder]
    metrics: dict[str, Any]


# ---------------------------------------------------------------- worker


def _start_fit(
    config: dict[str, Any], device: torch.device, rank: int, checkpoint: Path | None
) -> Fit:
    """Fresh SAEs, or the ones of the checkpoint a restarted group or `--resume` hands over.
    Each SAE starts from its own `init_seed` alone, so a co-trained SAE starts where its
    solo fit would."""
    cfg = SaeTrainConfig(**config["cfg"])
    members = cfg.members()
    saes, opts, trackers = {}, {}, {}
    for key, m in members.items():
        torch.manual_seed(m.init_seed)
        saes[key] = SparseAutoencoder(sae_config(m)).to(device)
        opts[key] = make_optimizer(
            m.optimizer, saes[key].parameters(), m.learning_rate, m.weight_decay
        )
        trackers[key] = DeadTracker(
            torch.zeros(m.latents, dtype=torch.long, device=device),
            m.dead_tokens,
            m.dead_percentage_threshold,
        )
    progress = Progress()
    if checkpoint is not None:
        progress = load_checkpoint(checkpoint, saes, opts, trackers)
    save_dir = Path(config["save_dir"]) if config.get("save_dir") else None
    budget = cfg.max_tokens or cfg.epochs * config["rows"]
    fit = Fit(cfg, saes, opts, trackers, progress, rank, budget, save_dir, members=members)
    fit.steps = total_steps(budget, cfg.batch_size, cfg.grad_acc_steps)
    fit.started_tokens, fit.resumed_from = progress.tokens, progress.step
    fit.restored = checkpoint is not None
    return fit


def sae_config(m: SaeTrainConfig) -> SaeConfig:
    """The model's config of one member of a fit (`SaeTrainConfig.members`)."""
    return SaeConfig(
        m.d_in,
        m.latents,
        m.k,
        m.architecture,
        m.l0_coefficient,
        m.matryoshka_widths,
        m.target_l0,
        transcode=m.transcode,
        d_out=m.width(m.target()) if m.transcode else None,
        skip_connection=m.skip_connection,
    )


def _make_feed(config: dict[str, Any], cfg: SaeTrainConfig, world: int, device: torch.device):
    """Where batches come from: a given factory (benchmarks), the model end to end (`ce`,
    `kl`), or the stored activations."""
    if config.get("feed") is not None:
        return config["feed"](cfg, world, device)
    if cfg.loss_fn in ("ce", "kl"):
        return ModelFeed(cfg, config["e2e"], world, device)
    return ActivationFeed(cfg, world, device)


def _backward(fit: Fit, feed, batch, world: int, device: torch.device) -> bool:
    """One micro-batch's loss and backward; True when it completes an optimizer step (under
    DDP, gradients are synchronised only on that one)."""
    cfg = fit.cfg
    last_micro = (fit.micro + 1) % cfg.grad_acc_steps == 0
    use_autocast = cfg.autocast and device.type == "cuda" and torch.cuda.is_bf16_supported()
    with contextlib.ExitStack() as stack:
        if world > 1 and not last_micro:
            for model in fit.models.values():
                stack.enter_context(model.no_sync())
        stack.enter_context(torch.autocast(device.type, torch.bfloat16, enabled=use_autocast))
        loss, fit.stats = feed.losses(fit.models, fit.saes, batch, fit.trackers)
        # the FVUs are all-reduced: a non-finite one stops every rank at the same step
        if not torch.isfinite(loss) or not all(math.isfinite(s["fvu"]) for s in fit.stats.values()):
            raise FloatingPointError(
                f"SAE loss is {loss.item()} at step {fit.progress.step} "
                f"({', '.join(cfg.hookpoints)}): the fit diverged or its activations "
                "are not finite"
            )
        (loss / cfg.grad_acc_steps).backward()
    fit.micro += 1
    return last_micro


def _step_settings(fit: Fit) -> None:
    """Each SAE's k (annealing ends by the fit's last step at latest) and L0 coefficient
    (warming up) for the coming step."""
    step = fit.progress.step
    for key, sae in fit.saes.items():
        m = fit.members[key]
        sae.cfg.k = k_at(step, m.k, m.k_anneal_from, min(m.k_anneal_steps, fit.steps))
        sae.cfg.l0_coefficient = warmed(m.l0_coefficient, step, m.l0_warmup_steps)


def _epoch(fit: Fit, feed, shard, log: RunLog, world: int, device: torch.device) -> bool:
    """Train on one pass of this worker's shard (from where a resume left it); True when
    the budget ran out inside it."""
    progress, cfg = fit.progress, fit.cfg
    epoch, skip = progress.epoch, progress.batches_in_epoch
    seen_any = False
    for i, batch in enumerate(feed.batches(shard, epoch)):
        seen_any = True
        if i < skip:  # consumed before the checkpoint this run resumed from
            continue
        if cfg.normalize_activations:
            if not progress.scales:  # the first batch (all ranks): E‖x‖ = √d from here on
                progress.scales = feed.norm_scales(batch)
            batch = feed.scaled(batch, progress.scales)
        if not fit.models:
            if not fit.restored:
                feed.init_b_dec(fit.saes, batch)  # rank 0's first batch; DDP broadcasts it
            fit.models = {key: _prepare(sae, world) for key, sae in fit.saes.items()}
        _step_settings(fit)
        step_due = _backward(fit, feed, batch, world, device)
        first = next(iter(fit.stats.values()))
        n_global = first["tokens"]
        progress.tokens += n_global
        progress.batches_in_epoch = i + 1
        log.tokens(n_global)
        if not step_due:
            continue
        for hp, sae in fit.saes.items():
            m = fit.members[hp]
            factor = lr_factor(
                progress.step, m.lr_warmup_steps, fit.steps, m.lr_decay, m.lr_end_factor
            )
            set_lr(fit.opts[hp], m.learning_rate, factor)  # this step's learning rate
            optimizer_step(sae, fit.opts[hp])
        progress.step += 1
        progress.fvu_curve.append(round(first["fvu"], 6))
        if len(fit.stats) > 1:
            for key, stats in fit.stats.items():
                progress.fvu_curves.setdefault(key, []).append(round(stats["fvu"], 6))
        done = fit.done()
        if fit.rank == 0 and (progress.step % cfg.log_every == 0 or done):
            log.row(fit, epoch)
        if progress.step % cfg.save_every == 0 or done:
            _report(fit)
        if done:
            return True
    if not seen_any:  # cycling an empty shard for a token budget would never end
        raise RuntimeError(f"worker {fit.rank} received no activation rows")
    progress.epoch += 1
    progress.batches_in_epoch = 0
    return False


def fit_saes(
    config: dict[str, Any],
    shard,
    checkpoint: Path | None,
    save: Callable[[Fit], None],
) -> Fit:
    """Train this rank's share of the fit (from `checkpoint` when given) to its budget,
    handing every checkpoint to `save`. Every rank of the process group calls it."""
    device = worker_device()
    rank, world = rank_world()
    # The feed first: a stream's first read runs while the SAEs are built and the log opens.
    feed = _make_feed(config, SaeTrainConfig(**config["cfg"]), world, device)
    fit = _start_fit(config, device, rank, checkpoint)
    fit.save = save
    log = RunLog(fit, config.get("wandb_dir"))
    fit.started = time.perf_counter()  # this run's clock starts with its first batch
    done = fit.done()
    while not done:
        done = _epoch(fit, feed, shard, log, world, device)
        if not done and fit.cfg.max_tokens is None and fit.progress.epoch >= fit.cfg.epochs:
            done = fit.finished = True
            if fit.progress.step % fit.cfg.save_every:  # the last step's checkpoint
                _report(fit)
    log.close()
    return fit


def _prepare(sae: SparseAutoencoder, world: int) -> torch.nn.Module:
    """DDP-wrapped across several workers; alone, the SAE itself (Ray Train's prepare_model
    would only move it to the device it is on, and it needs a Train session)."""
    return ray.train.torch.prepare_model(sae) if world > 1 else sae


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker of a `train-sae` run. Workers get equal shards, so they take
    the same steps."""
    shard = ray.train.get_dataset_shard("train") if config.get("dataset", True) else None
    checkpoint = ray.train.get_checkpoint() or config.get("resume_from")
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as directory:
        fit_saes(config, shard, Path(directory) if directory else None, _report_to_train)


def fit_metrics(fit: Fit) -> dict[str, Any]:
    """Where the fit is: the last checkpoint's metrics, and the run's own tokens/s."""
    progress = fit.progress
    return {
        "step": progress.step,
        "resumed_from_step": fit.resumed_from,
        "tokens": progress.tokens,
        "run_tokens": progress.tokens - fit.started_tokens,
        "elapsed_s": time.perf_counter() - fit.started,
        "steps_to_fvu": steps_to_fvu(progress.fvu_curve),
        **{f"steps_to_fvu/{h}": steps_to_fvu(c) for h, c in progress.fvu_curves.items()},
        **{f"{k}/{h}": v for h, s in fit.stats.items() for k, v in s.items() if k != "tokens"},
    }


def steps_to_fvu(curve: list[float], within: float = 0.1) -> float:
    """How fast the fit converged: the first step at which the FVU's trailing mean over a
    twentieth of the run (batch noise smoothed) is within `within` (10 %) of the final
    FVU (the mean of the last tenth of the steps). NaN without steps."""
    if not curve:
        return float("nan")
    values = np.asarray(curve, dtype=np.float64)
    final = values[-max(1, len(values) // 10) :].mean()
    window = max(1, len(values) // 20)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    hits = np.flatnonzero(smooth <= final * (1 + within))
    return float(hits[0] + window) if len(hits) else float(len(values))


def _report(fit: Fit) -> None:
    if fit.save is not None:
        fit.save(fit)


def _report_to_disk(fit: Fit) -> None:
    """One process, no Ray: every checkpoint straight to `<save_dir>` (sparsify's layout)."""
    if fit.save_dir is not None:
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp), fit.published(), fit.opts, fit.trackers, fit.progress)
            publish(Path(tmp), fit.save_dir)


def fit_in_process(
    columns: dict[str, torch.Tensor], cfg: SaeTrainConfig, save_dir: Path | None = None
) -> SaeTrainResult:
    """The same fit in this process, without Ray: each SAE on its hookpoint's rows of
    `columns` (one tensor per hookpoint, rows in stream order; `shuffle_buffer_tokens`
    shuffles each epoch's rows whole). Same steps, checkpoints and metrics as `train_saes`
    with one worker; a laptop's or a notebook's way to train on an array."""
    from sae_ray.sae.feeds import ArrayFeed

    rows = len(next(iter(columns.values())))
    config = {
        "cfg": cfg.model_dump(),
        "rows": rows,
        "save_dir": str(save_dir) if save_dir else None,
        "feed": lambda c, world, device: ArrayFeed(c, world, device, columns),
    }
    if save_dir is not None and save_dir.exists():
        shutil.rmtree(save_dir)
    fit = fit_saes(config, None, None, _report_to_disk)
    metrics = fit_metrics(fit)
    metrics["tokens_per_s"] = metrics.pop("run_tokens") / max(metrics.pop("elapsed_s"), 1e-9)
    return SaeTrainResult(saes=fit.published(), metrics=metrics)


def _report_to_train(fit: Fit) -> None:
    """Checkpoint to Ray Train (worker-fault restarts read it back) and, on rank 0, publish
    it to `<save_dir>/<run_name>` in sparsify's layout. Every rank calls report."""
    metrics = fit_metrics(fit)
    if fit.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), fit.published(), fit.opts, fit.trackers, fit.progress)
        if fit.save_dir is not None:
            publish(Path(tmp), fit.save_dir)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


# ---------------------------------------------------------------- driver


def train_saes(
    dataset: ray.data.Dataset | None,
    tokens_per_epoch: int,
    cfg: SaeTrainConfig,
    resources: Resources,
    storage_path: Path | str,
    save_dir: Path | None = None,
    resume: bool = False,
    train_run_name: str | None = None,
    wandb_dir: Path | None = None,
    e2e: dict[str, Any] | None = None,
    feed: Any = None,
) -> SaeTrainResult:
    """Fit one SAE per hookpoint: on stored activations (`activation_dataset`), or end to
    end on token rows with `e2e` = {model, kind, layers, ctx_len} (see `spliced.py`).

    `save_dir` (the run's directory, `<save_dir>/<run_name>`) receives every checkpoint in
    sparsify's layout; with `resume` the run continues from the one there. `feed`, a factory
    `(cfg, world, device) -> feed` called on each worker, replaces how batches are made (a
    held set's `feeds.held_feed`, with `dataset` None; the benchmarks' baselines).
    """
    quiet_ordered_data()
    resume_from = None
    if save_dir is not None:
        if resume and (save_dir / STATE).is_file():
            state = Progress(**json.loads((save_dir / STATE).read_text()))
            if state.tokens >= (cfg.max_tokens or cfg.epochs * tokens_per_epoch):
                saes = {key: SparseAutoencoder.load(save_dir / key) for key in cfg.members()}
                return SaeTrainResult(saes, {"step": state.step, "tokens": state.tokens})
            resume_from = Checkpoint.from_directory(str(save_dir))
            truncate_log(save_dir / "metrics.jsonl", state.step)
        elif not resume and save_dir.exists():
            shutil.rmtree(save_dir)  # a fresh run does not inherit an old run's log
    loop_config = {
        "cfg": cfg.model_dump(),
        "rows": tokens_per_epoch,
        "e2e": e2e,
        "save_dir": str(save_dir) if save_dir else None,
        "resume_from": resume_from,
        "wandb_dir": str(wandb_dir) if wandb_dir else None,
        "feed": feed,
        "dataset": dataset is not None,
    }
    trainer = torch_trainer(
        train_loop,
        loop_config,
        resources,
        train_run_name or cfg.run_name,
        storage_path,
        datasets={"train": dataset} if dataset is not None else None,
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as directory:
        saes = {key: SparseAutoencoder.load(Path(directory) / key) for key in cfg.members()}
    metrics = dict(result.metrics)
    metrics["tokens_per_s"] = metrics.pop("run_tokens") / max(metrics.pop("elapsed_s"), 1e-9)
    return SaeTrainResult(saes=saes, metrics=metrics)
