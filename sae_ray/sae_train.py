"""Train the TopK SAE with Ray Train workers fed by Ray Data from the activation shards.

Driver: `train_sae` reads the token shards with `ray.data.read_parquet` and runs a
`TorchTrainer`. Worker: `train_loop` streams its shard (`get_dataset_shard` ->
`iter_torch_batches`), trains under DDP, and rank 0 reports the SAE as a checkpoint.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, ScalingConfig
from ray.train.torch import TorchTrainer

from sae_ray.activations import read_manifest
from sae_ray.config import Resources, Sae
from sae_ray.sae import SaeConfig, SparseAutoencoder, auxk_loss, default_lr

MATERIALIZE_BYTES = 256 << 20  # activation sets up to this size are read once, then reused


@dataclass
class SaeTrainResult:
    sae: SparseAutoencoder
    metrics: dict[str, float]


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
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
class StepState:
    """What a worker carries between steps besides the model and optimiser."""

    tokens_since_fired: torch.Tensor
    dead_tokens: int
    auxk_alpha: float
    world: int = 1


def apply_update(sae: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """Backward and step, keeping decoder rows on the unit sphere (sparsify's recipe; works
    for its SparseCoder too, which has the same two decoder methods)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
    sae.set_decoder_norm_to_unit_norm()


def train_step(
    model: torch.nn.Module,
    sae: SparseAutoencoder,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    state: StepState,
) -> dict[str, float]:
    """One SAE update on this worker's batch; under DDP the step is the union batch's step."""
    x_hat, codes = model(x)
    total_var, n_global = global_total_variance(x)
    loss_fvu = (x - x_hat).pow(2).sum() / total_var
    dead = state.tokens_since_fired > state.dead_tokens
    aux = auxk_loss(sae, x, x_hat, codes.pre, dead, total_variance=total_var)
    # DDP averages gradients over workers; scaling by world size turns that into the sum.
    loss = state.world * (loss_fvu + state.auxk_alpha * aux)
    apply_update(sae, opt, loss)
    with torch.no_grad():
        fired = torch.zeros_like(state.tokens_since_fired)
        fired[codes.indices[codes.values > 0]] = 1
        fired = _all_reduce(fired, dist.ReduceOp.MAX)
        state.tokens_since_fired += n_global
        state.tokens_since_fired[fired.bool()] = 0
        fvu_global = _all_reduce(loss_fvu.detach().clone()).item()
    return {
        "loss": fvu_global + state.auxk_alpha * aux.item(),
        "fvu": fvu_global,
        "l0": (codes.values > 0).sum(-1).float().mean().item(),
        "dead_pct": 100.0 * dead.float().mean().item(),
        "tokens": n_global,
    }


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker. Every worker runs the same number of steps (equal shards)."""
    torch.manual_seed(config["seed"])
    device = ray.train.torch.get_device()
    ctx = ray.train.get_context()
    shard = ray.train.get_dataset_shard("train")
    sae = SparseAutoencoder(SaeConfig(config["d_in"], config["num_latents"], config["k"]))
    sae.to(device)
    state = StepState(
        tokens_since_fired=torch.zeros(sae.cfg.num_latents, dtype=torch.long, device=device),
        dead_tokens=config["dead_tokens"],
        auxk_alpha=config["auxk_alpha"],
        world=ctx.get_world_size(),
    )
    model = opt = None
    seen, started, last = 0, time.perf_counter(), {}
    for epoch in range(config["epochs"]):
        for batch in shard.iter_torch_batches(
            batch_size=config["batch_size"], dtypes=torch.float32, device=device
        ):
            x = batch["x"]
            if model is None:
                # b_dec from rank 0's first batch; DDP broadcasts rank 0's parameters.
                sae.init_b_dec(x)
                model = ray.train.torch.prepare_model(sae)
                opt = torch.optim.Adam(sae.parameters(), lr=config["lr"], eps=6.25e-10)
            last = train_step(model, sae, opt, x, state)
            seen += last.pop("tokens")
            last["epoch"] = epoch
    elapsed = time.perf_counter() - started
    last.update(tokens=seen, tokens_per_s=seen / max(elapsed, 1e-9))
    if ctx.get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            sae.save(Path(tmp))
            ray.train.report(last, checkpoint=Checkpoint.from_directory(tmp))
    else:
        ray.train.report(last)


def train_sae(
    tokens_dir: Path, cfg: Sae, resources: Resources, seed: int, run_name: str, storage_path: Path
) -> SaeTrainResult:
    """Fit an SAE on the token shards under `tokens_dir` (read through Ray Data)."""
    manifest = read_manifest(tokens_dir, verify=True)
    num_latents = manifest.d * cfg.expansion_factor
    SaeConfig(manifest.d, num_latents, cfg.k)  # fail fast on k > latents, before any worker
    context = ray.data.DataContext.get_current()
    # Per-operator progress bars from every worker drown the sweep's own output.
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True  # same blocks in the same order each run
    dataset = ray.data.read_parquet(manifest.paths(tokens_dir), columns=["x"])
    if manifest.rows * manifest.d * 4 <= MATERIALIZE_BYTES:
        # Each lazy pass re-plans and re-reads (seconds even on MBs): read small sets once.
        dataset = dataset.materialize()
    loop_config = {
        "seed": seed,
        "d_in": manifest.d,
        "num_latents": num_latents,
        "k": cfg.k,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr or default_lr(num_latents),
        "auxk_alpha": cfg.auxk_alpha,
        "dead_tokens": cfg.dead_tokens,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(name=run_name, storage_path=str(storage_path)),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as directory:
        sae = SparseAutoencoder.load(Path(directory))
    return SaeTrainResult(sae=sae, metrics=dict(result.metrics))
