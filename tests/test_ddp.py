"""2 DDP workers on b1, b2 take the same SAE step as 1 worker on b1 ∪ b2 (AuxK included)."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from sae_ray.sae.model import SaeConfig, SparseAutoencoder
from sae_ray.sae.training import DeadTracker, make_optimizer, train_step

CFG = SaeConfig(d_in=16, num_latents=64, k=4)
STEPS = 2


def _setup(seed=0):
    torch.manual_seed(seed)
    sae = SparseAutoencoder(CFG)
    batches = [torch.randn(128, 16) * 2 + 1 for _ in range(STEPS)]
    sae.init_b_dec(batches[0])
    fired = torch.zeros(CFG.num_latents, dtype=torch.long)
    fired[CFG.num_latents // 2 :] = 10**6  # half the latents start dead: AuxK is exercised
    return sae, batches, fired


def _tracker(fired):
    tracker = DeadTracker(torch.zeros_like(fired), window=1000)
    tracker.prev_fires, tracker.prev_tokens = fired.clone(), 1000
    return tracker


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    sae, batches, fired = _setup()
    model = DistributedDataParallel(sae)
    opt = make_optimizer("adam", sae.parameters(), lr=1e-3)
    tracker = _tracker(fired)
    for x in batches:
        train_step(model, sae, opt, x.chunk(world)[rank].contiguous(), tracker, 0.5, world)
    if rank == 0:
        tensors = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
        save_file({**tensors, **tracker.tensors()}, out)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_match_one_worker_on_the_union(tmp_path):
    out = str(tmp_path / "ddp.safetensors")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ddp = load_file(out)

    sae, batches, fired = _setup()
    opt = make_optimizer("adam", sae.parameters(), lr=1e-3)
    tracker = _tracker(fired)
    metrics = [train_step(sae, sae, opt, x, tracker, 0.5) for x in batches]
    assert metrics[0]["tokens"] == 128 and metrics[0]["auxk"] > 0
    for name, value in sae.state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, value in tracker.tensors().items():
        torch.testing.assert_close(ddp[name], value, msg=name)
    start, _, _ = _setup()
    moved = (start.W_dec - sae.W_dec).abs().max()
    assert moved > 1e-4  # the step did something, so the match is not trivial
