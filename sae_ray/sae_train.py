"""Train TopK SAEs with Ray Train workers fed by Ray Data from the activation shards.

One trainer for everything: `sae-ray train-sae` (several hookpoints at once, the saetrain
flags) and every cycle of a sweep. Driver: `train_saes` reads the token shards with
`ray.data.read_parquet` and runs a `TorchTrainer`. Worker: `train_loop` streams its shard,
trains one SAE per hookpoint under DDP, logs, and checkpoints in sparsify's layout.

A step is DDP-exact: every worker's loss is normalised by the union batch's variance and
scaled by the world size, so N workers on b1..bN take the step one worker takes on their
union. Dead latents and the token budget are counted over all workers, in tokens.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.train import Checkpoint, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file, save_file

from sae_ray import telemetry
from sae_ray.activations import column_of, read_manifest
from sae_ray.config import Resources
from sae_ray.sae import SaeConfig, SparseAutoencoder, auxk_loss, decoder_absorption, default_lr

MATERIALIZE_BYTES = 256 << 20  # activation sets up to this size are read once, then reused
BLOCK_BYTES = 16 << 20  # Ray Data blocks of the activation feed
STATE = "state.json"


class SaeTrainConfig(BaseModel):
    """What one SAE training run needs; the CLI flags and the sweep's `sae` section map here."""

    model_config = ConfigDict(extra="forbid")

    hookpoints: list[str] = Field(min_length=1)
    d_in: int = Field(ge=1)
    k: int = Field(32, ge=1)
    expansion_factor: int = Field(32, ge=1)
    num_latents: int | None = Field(None, ge=1, description="overrides expansion_factor")
    batch_tokens: int = Field(4096, ge=1, description="tokens per micro-batch, all workers")
    grad_acc_steps: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="global budget; else epochs")
    epochs: int = Field(1, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float | None = Field(None, gt=0, description="default scales with 1/sqrt(latents)")
    weight_decay: float = Field(0.0, ge=0)
    auxk_alpha: float = Field(1 / 32, ge=0)
    loss_fn: Literal["fvu", "mse", "ce", "kl"] = Field(
        "fvu", description="ce / kl: end to end, the SAE spliced into the model's forward"
    )
    dead_window_tokens: int = Field(10_000_000, ge=1)
    dead_percentage_threshold: float = Field(0.0, ge=0, le=1)
    save_every: int = Field(1000, ge=1, description="optimizer steps between checkpoints")
    log_every: int = Field(100, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop early (resumable) after this")
    init_seed: int = 42
    shuffle_seed: int = 42
    shuffle_buffer_tokens: int = Field(0, ge=0, description="0 keeps the stored order")
    autocast: bool = Field(True, description="bf16 autocast of the encoder on a CUDA device")
    progress: bool = True
    log_to_wandb: bool = False
    wandb_project: str = "sae-ray"
    run_name: str = "sae"
    sweep: str = Field("", description="tag of the dashboard metrics (default: run_name)")

    @model_validator(mode="after")
    def _check(self) -> SaeTrainConfig:
        if self.k > self.latents:
            raise ValueError(f"k: {self.k} is larger than the {self.latents} latents")
        return self

    @property
    def latents(self) -> int:
        return self.num_latents or self.d_in * self.expansion_factor

    @property
    def learning_rate(self) -> float:
        return self.lr or default_lr(self.latents)


@dataclass
class SaeTrainResult:
    saes: dict[str, SparseAutoencoder]
    metrics: dict[str, Any]


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _dist():
        dist.all_reduce(t, op=op)
    return t


def global_total_variance(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ‖x − μ‖² of the union of every worker's batch, and its row count.

    Normalising each worker's squared error by the union's variance (not its own) makes the
    DDP-averaged gradient equal to the gradient of the union batch's FVU.
    """
    x64 = x.detach().double()
    stats = torch.cat([x64.sum(0), x64.pow(2).sum().view(1), x64.new_tensor([len(x)])])
    stats = _all_reduce(stats)
    total, sq, n = stats[:-2], stats[-2], stats[-1]
    return (sq - total.pow(2).sum() / n).clamp_min(1e-12).float(), int(n.item())


@dataclass
class DeadTracker:
    """Firing counts over a sliding window of tokens (all workers), for AuxK and dead %.

    A latent is dead when, over the last one to two windows, it fired on fewer than
    `threshold` of the tokens (and at least once is always required). Nothing is dead before
    a first full window: a fresh latent has not had its chance yet.
    """

    fires: torch.Tensor  # (latents,) int64, current window
    window: int
    threshold: float = 0.0
    prev_fires: torch.Tensor | None = None
    tokens: int = 0
    prev_tokens: int = 0

    def update(self, indices: torch.Tensor, values: torch.Tensor, n_global: int) -> None:
        counts = torch.bincount(indices[values > 0], minlength=len(self.fires))
        self.fires += _all_reduce(counts.to(self.fires.dtype))
        self.tokens += n_global
        if self.tokens >= self.window:
            self.prev_fires, self.prev_tokens = self.fires.clone(), self.tokens
            self.fires.zero_()
            self.tokens = 0

    def dead(self) -> torch.Tensor:
        if self.prev_fires is None:
            return torch.zeros_like(self.fires, dtype=torch.bool)
        seen = self.tokens + self.prev_tokens
        return (self.fires + self.prev_fires) < max(self.threshold * seen, 1.0)

    def tensors(self) -> dict[str, torch.Tensor]:
        prev = self.prev_fires if self.prev_fires is not None else torch.zeros_like(self.fires)
        counts = torch.tensor([self.tokens, self.prev_tokens, int(self.prev_fires is not None)])
        return {"fires": self.fires, "prev_fires": prev, "token_counts": counts}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.fires.copy_(tensors["fires"])
        self.tokens, self.prev_tokens, has_prev = (int(v) for v in tensors["token_counts"])
        self.prev_fires = tensors["prev_fires"].to(self.fires) if has_prev else None


def make_optimizer(
    name: str, params, lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """Adam is the fused kernel (one pass over the parameters: 15x faster than the default
    on CPU, and the fastest on CUDA)."""
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, eps=6.25e-10, weight_decay=weight_decay, fused=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, eps=6.25e-10, weight_decay=weight_decay, fused=True)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def sae_loss(
    model: torch.nn.Module,
    sae: SparseAutoencoder,
    x: torch.Tensor,
    tracker: DeadTracker,
    auxk_alpha: float,
    world: int = 1,
    loss_fn: str = "fvu",
) -> tuple[torch.Tensor, dict[str, float]]:
    """This worker's share of the union batch's FVU (or MSE per token) + α·AuxK, already
    × world for DDP."""
    dead = tracker.dead()
    x_hat, codes = model(x, dead)
    total_var, n_global = global_total_variance(x)
    sq_err = (x - x_hat).pow(2).sum()
    loss_fvu = sq_err / total_var
    aux = auxk_loss(sae, x, x_hat, codes, int(dead.sum()), total_variance=total_var)
    main = loss_fvu if loss_fn == "fvu" else sq_err / n_global
    # DDP averages gradients over workers; scaling by world size turns that into the sum.
    loss = world * (main + auxk_alpha * aux)
    with torch.no_grad():
        tracker.update(codes.indices, codes.values, n_global)
        fvu_global = _all_reduce(loss_fvu.detach().clone()).item()
    return loss, {
        "loss": fvu_global + auxk_alpha * aux.item(),
        "fvu": fvu_global,
        "auxk": aux.item(),
        "l0": (codes.values > 0).sum(-1).float().mean().item(),
        "dead_pct": 100.0 * dead.float().mean().item(),
        "tokens": n_global,
    }


def optimizer_step(sae: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Step, keeping decoder rows on the unit sphere (sparsify's recipe; works for its
    SparseCoder too, which has the same two decoder methods)."""
    sae.remove_gradient_parallel_to_decoder_directions()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.set_decoder_norm_to_unit_norm()


def apply_update(sae: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    loss.backward()
    optimizer_step(sae, opt)


def train_step(
    model: torch.nn.Module,
    sae: SparseAutoencoder,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    tracker: DeadTracker,
    auxk_alpha: float,
    world: int = 1,
) -> dict[str, float]:
    """One SAE update on this worker's batch; under DDP the step is the union batch's step."""
    loss, stats = sae_loss(model, sae, x, tracker, auxk_alpha, world)
    apply_update(sae, opt, loss)
    return stats


class ActivationFeed:
    """Stored activations -> each hookpoint's SAE on its own column (the local losses)."""

    def __init__(self, cfg: SaeTrainConfig, world: int, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device

    def batches(self, shard, epoch: int):
        cfg = self.cfg
        return shard.iter_torch_batches(
            batch_size=max(1, cfg.batch_tokens // self.world),
            dtypes=torch.float32,
            device=self.device,
            local_shuffle_buffer_size=cfg.shuffle_buffer_tokens or None,
            local_shuffle_seed=cfg.shuffle_seed + epoch if cfg.shuffle_buffer_tokens else None,
        )

    def init_b_dec(self, saes: dict[str, SparseAutoencoder], batch) -> None:
        for hp, sae in saes.items():
            sae.init_b_dec(batch[hp])

    def losses(self, models, saes, batch, trackers) -> tuple[torch.Tensor, dict[str, dict]]:
        total, stats = 0.0, {}
        for hp, sae in saes.items():  # disjoint parameters: one backward of the sum suffices
            loss, stats[hp] = sae_loss(
                models[hp],
                sae,
                batch[hp],
                trackers[hp],
                self.cfg.auxk_alpha,
                self.world,
                self.cfg.loss_fn,
            )
            total = total + loss
        return total, stats


# ---------------------------------------------------------------- checkpoints


@dataclass
class Progress:
    """Where the run is; saved with each checkpoint so a resume skips what was trained."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens trained on, all workers
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors + JSON, so checkpoints stay pickle-free."""
    state = opt.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entry in state["state"].items():
        meta["state"][str(pid)] = {}
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                meta["state"][str(pid)][name] = value
    return tensors, meta


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in meta["state"].items()}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    directory: Path,
    saes: dict[str, SparseAutoencoder],
    opts: dict[str, torch.optim.Optimizer],
    trackers: dict[str, DeadTracker],
    progress: Progress,
) -> None:
    """sparsify's layout (`<hookpoint>/sae.safetensors` + `cfg.json`) plus what a resume
    needs beside it: optimizer and dead-latent state (safetensors), progress (JSON)."""
    for hp, sae in saes.items():
        sae.save(directory / hp)
        tensors, meta = _flatten_optimizer(opts[hp])
        save_file(tensors, str(directory / hp / "optimizer.safetensors"))
        (directory / hp / "optimizer.json").write_text(json.dumps(meta))
        tracker = {k: v.contiguous().cpu() for k, v in trackers[hp].tensors().items()}
        save_file(tracker, str(directory / hp / "dead.safetensors"))
    (directory / STATE).write_text(json.dumps(asdict(progress)))


def load_checkpoint(
    directory: Path,
    saes: dict[str, SparseAutoencoder],
    opts: dict[str, torch.optim.Optimizer],
    trackers: dict[str, DeadTracker],
) -> Progress:
    device = next(iter(saes.values())).b_dec.device
    for hp, sae in saes.items():
        sae.load_state_dict(load_file(str(directory / hp / "sae.safetensors"), device=str(device)))
        meta = json.loads((directory / hp / "optimizer.json").read_text())
        tensors = load_file(str(directory / hp / "optimizer.safetensors"), device=str(device))
        _restore_optimizer(opts[hp], tensors, meta)
        trackers[hp].load(load_file(str(directory / hp / "dead.safetensors"), device=str(device)))
    return Progress(**json.loads((directory / STATE).read_text()))


def publish(src: Path, dest: Path) -> None:
    """Replace `dest` with a copy of `src` through a temporary sibling and a rename, so a
    crash leaves the previous checkpoint or the new one, never half of one. Files in `dest`
    that the checkpoint does not own (the metrics log) move over."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    old = dest.with_name(f".{dest.name}.old")
    if dest.exists():
        for path in dest.iterdir():
            if not (tmp / path.name).exists():
                path.rename(tmp / path.name)
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- worker


def _log_metrics(
    cfg: SaeTrainConfig, saes: dict[str, SparseAutoencoder], stats: dict[str, dict[str, float]]
) -> dict[str, float]:
    """sparsify-style keys (`fvu/<hookpoint>`), all on the TopK codes."""
    out: dict[str, float] = {}
    for hp, s in stats.items():
        for name in ("loss", "fvu", "auxk", "l0", "dead_pct"):
            out[f"{name}/{hp}"] = s[name]
        out[f"absorption/{hp}"] = decoder_absorption(saes[hp].W_dec.detach())
    return out


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker. Workers get equal shards, so they take the same steps."""
    cfg = SaeTrainConfig(**config["cfg"])
    device = ray.train.torch.get_device()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    make_feed = config.get("feed")  # (cfg, world, device) -> a feed; default: the dataset's
    shard = ray.train.get_dataset_shard("train") if config.get("dataset", True) else None
    torch.manual_seed(cfg.init_seed)
    saes = {
        hp: SparseAutoencoder(SaeConfig(cfg.d_in, cfg.latents, cfg.k)).to(device)
        for hp in cfg.hookpoints
    }
    opts = {
        hp: make_optimizer(cfg.optimizer, sae.parameters(), cfg.learning_rate, cfg.weight_decay)
        for hp, sae in saes.items()
    }
    trackers = {
        hp: DeadTracker(
            torch.zeros(cfg.latents, dtype=torch.long, device=device),
            cfg.dead_window_tokens,
            cfg.dead_percentage_threshold,
        )
        for hp in cfg.hookpoints
    }
    progress = Progress()
    checkpoint = ray.train.get_checkpoint() or config.get("resume_from")
    if checkpoint is not None:  # a restarted worker group, or `--resume`
        with checkpoint.as_directory() as directory:
            progress = load_checkpoint(Path(directory), saes, opts, trackers)
    save_dir = Path(config["save_dir"]) if config.get("save_dir") else None
    budget = cfg.max_tokens or cfg.epochs * config["rows"]
    use_autocast = cfg.autocast and device.type == "cuda" and torch.cuda.is_bf16_supported()

    bar = wandb_run = None
    if rank == 0 and cfg.progress:
        from ray.experimental.tqdm_ray import tqdm

        bar = tqdm(total=budget, desc=cfg.run_name, unit="tok")
        bar.update(progress.tokens)
    if rank == 0 and cfg.log_to_wandb:
        import wandb

        wandb_run = wandb.init(
            project=cfg.wandb_project,
            name=cfg.run_name,
            config=cfg.model_dump(),
            dir=config.get("wandb_dir"),
            resume="allow",
            settings=wandb.Settings(quiet=True),
        )

    if make_feed is not None:
        feed = make_feed(cfg, world, device)
    elif cfg.loss_fn in ("ce", "kl"):
        from sae_ray.e2e import ModelFeed

        feed = ModelFeed(cfg, config["e2e"], world, device)
    else:
        feed = ActivationFeed(cfg, world, device)
    models: dict[str, torch.nn.Module] = {}
    stats: dict[str, dict[str, float]] = {}
    started, started_tokens = time.perf_counter(), progress.tokens
    # this run's clock, token count (for its tokens/s) and the step it restarted from
    since = (started, started_tokens, progress.step)
    micro = 0
    done = progress.tokens >= budget or (cfg.max_steps and progress.step >= cfg.max_steps)
    while not done:
        epoch, skip = progress.epoch, progress.batches_in_epoch
        seen_any = False
        for i, batch in enumerate(feed.batches(shard, epoch)):
            seen_any = True
            if i < skip:  # consumed before the checkpoint this run resumed from
                continue
            if not models:
                if checkpoint is None:  # b_dec from rank 0's first batch; DDP broadcasts it
                    feed.init_b_dec(saes, batch)
                models = {hp: ray.train.torch.prepare_model(sae) for hp, sae in saes.items()}
            last_micro = (micro + 1) % cfg.grad_acc_steps == 0
            with contextlib.ExitStack() as stack:
                if world > 1 and not last_micro:
                    for model in models.values():
                        stack.enter_context(model.no_sync())
                stack.enter_context(
                    torch.autocast(device.type, torch.bfloat16, enabled=use_autocast)
                )
                loss, stats = feed.losses(models, saes, batch, trackers)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"SAE loss is {loss.item()} at step {progress.step} "
                        f"({', '.join(cfg.hookpoints)}): the fit diverged or its activations "
                        "are not finite"
                    )
                (loss / cfg.grad_acc_steps).backward()
            n_global = stats[cfg.hookpoints[0]]["tokens"]
            progress.tokens += n_global
            progress.batches_in_epoch = i + 1
            micro += 1
            if bar is not None:
                bar.update(n_global)
            if not last_micro:
                continue
            for hp, sae in saes.items():
                optimizer_step(sae, opts[hp])
            progress.step += 1
            done = progress.tokens >= budget or bool(
                cfg.max_steps and progress.step >= cfg.max_steps
            )
            if rank == 0 and (progress.step % cfg.log_every == 0 or done):
                rate = (progress.tokens - started_tokens) / (time.perf_counter() - started)
                row = {"step": progress.step, "tokens": progress.tokens, "epoch": epoch}
                row.update(_log_metrics(cfg, saes, stats), tokens_per_s=rate)
                for hp in cfg.hookpoints:
                    telemetry.sae_tokens_per_s(cfg.sweep or cfg.run_name, hp, rate)
                if bar is not None:
                    fvu, dead = (row[f"{m}/{cfg.hookpoints[0]}"] for m in ("fvu", "dead_pct"))
                    bar.set_description(f"{cfg.run_name} fvu {fvu:.3f} dead {dead:.0f}%")
                if wandb_run is not None:
                    wandb_run.log(row, step=progress.step)
                if save_dir is not None:
                    save_dir.mkdir(parents=True, exist_ok=True)
                    with (save_dir / "metrics.jsonl").open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
            if progress.step % cfg.save_every == 0 or done:
                _report(cfg, saes, opts, trackers, progress, stats, rank, save_dir, since)
            if done:
                break
        else:
            if not seen_any:  # cycling an empty shard for a token budget would never end
                raise RuntimeError(f"worker {rank} received no activation rows")
            progress.epoch += 1
            progress.batches_in_epoch = 0
            if cfg.max_tokens is None and progress.epoch >= cfg.epochs:
                done = True
                if progress.step % cfg.save_every:  # the last step's checkpoint
                    _report(cfg, saes, opts, trackers, progress, stats, rank, save_dir, since)
    if bar is not None:
        bar.close()
    if wandb_run is not None:
        wandb_run.finish()


def _report(cfg, saes, opts, trackers, progress, stats, rank, save_dir, since) -> None:
    """Checkpoint to Ray Train (worker-fault restarts read it back) and, on rank 0, publish
    it to `<save_dir>/<run_name>` in sparsify's layout. Every rank calls report."""
    started, started_tokens, resumed_from = since
    metrics = {
        "step": progress.step,
        "resumed_from_step": resumed_from,
        "tokens": progress.tokens,
        "run_tokens": progress.tokens - started_tokens,
        "elapsed_s": time.perf_counter() - started,
        **{f"{k}/{h}": v for h, s in stats.items() for k, v in s.items() if k != "tokens"},
    }
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), saes, opts, trackers, progress)
        if save_dir is not None:
            publish(Path(tmp), save_dir)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


# ---------------------------------------------------------------- driver


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows past the checkpoint a resume starts from: those steps train again."""
    if path.is_file():
        rows = [r for r in path.read_text().splitlines() if json.loads(r)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def _quiet_ordered_data() -> None:
    context = ray.data.DataContext.get_current()
    # Per-operator progress bars from every worker drown the sweep's own output.
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True  # same blocks in the same order each run


def activation_dataset(
    tokens_dir: Path | str, hookpoints: list[str]
) -> tuple[ray.data.Dataset, int]:
    """The token shards under `tokens_dir` (a path, or a bucket URI that every node can read)
    as a Ray Dataset of the hookpoints' columns, and the number of token rows (checked against
    the manifest first).

    Read with Ray Data's file-based Parquet datasource (V1), in blocks of about
    `BLOCK_BYTES`: Ray 2.60's default (V2) lists the files in a remote task first, which put
    2-4 s before every epoch's first batch here, and a block per shard (100 MB) left the reads
    nothing to overlap with (`benchmarks/ray_data_feed.py` measures both)."""
    manifest = read_manifest(tokens_dir, verify=True)
    for hp in hookpoints:
        column_of(manifest, tokens_dir, hp)
    _quiet_ordered_data()
    nbytes = manifest.rows * manifest.d * np.dtype(manifest.dtype).itemsize * len(hookpoints)
    context = ray.data.DataContext.get_current()
    v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        dataset = ray.data.read_parquet(
            manifest.paths(tokens_dir),
            columns=hookpoints,
            override_num_blocks=max(len(manifest.files), -(-nbytes // BLOCK_BYTES)),
        )
    finally:
        context.use_datasource_v2 = v2
    if nbytes <= MATERIALIZE_BYTES:
        # Each lazy pass re-plans and re-reads (seconds even on MBs): read small sets once.
        dataset = dataset.materialize()
    return dataset, manifest.rows


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
    end on token rows with `e2e` = {model, kind, layers, ctx_len} (see `e2e.py`).

    `save_dir` (the run's directory, `<save_dir>/<run_name>`) receives every checkpoint in
    sparsify's layout; with `resume` the run continues from the one there. `feed`, a factory
    `(cfg, world, device) -> feed` called on each worker, replaces how batches are made (the
    benchmarks' in-memory baseline, with `dataset` None, and their timed Ray Data feed).
    """
    _quiet_ordered_data()
    resume_from = None
    if save_dir is not None:
        if resume and (save_dir / STATE).is_file():
            state = Progress(**json.loads((save_dir / STATE).read_text()))
            if state.tokens >= (cfg.max_tokens or cfg.epochs * tokens_per_epoch):
                saes = {hp: SparseAutoencoder.load(save_dir / hp) for hp in cfg.hookpoints}
                return SaeTrainResult(saes, {"step": state.step, "tokens": state.tokens})
            resume_from = Checkpoint.from_directory(str(save_dir))
            _truncate_log(save_dir / "metrics.jsonl", state.step)
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
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=train_run_name or cfg.run_name,
            storage_path=str(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=resources.max_failures),
        ),
        datasets={"train": dataset} if dataset is not None else None,
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as directory:
        saes = {hp: SparseAutoencoder.load(Path(directory) / hp) for hp in cfg.hookpoints}
    metrics = dict(result.metrics)
    metrics["tokens_per_s"] = metrics.pop("run_tokens") / max(metrics.pop("elapsed_s"), 1e-9)
    return SaeTrainResult(saes=saes, metrics=metrics)
