"""SAE checkpoints in sparsify's layout (`<hookpoint>/sae.safetensors` + `cfg.json`), with
what an exact resume needs beside it (optimizer and dead-latent state as safetensors,
progress as JSON: nothing pickled), published whole by rename."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sae_ray import storage
from sae_ray.sae.model import SparseAutoencoder
from sae_ray.sae.training import DeadTracker

STATE = "state.json"


@dataclass
class Progress:
    """Where the run is; saved with each checkpoint so a resume skips what was trained."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens trained on, all workers
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    fvu_curve: list[float] = field(default_factory=list)  # the first SAE's FVU, per step
    # with several SAEs on the stream, each one's FVU per step (its own steps_to_fvu)
    fvu_curves: dict[str, list[float]] = field(default_factory=dict)
    # normalize_activations: each hookpoint's scale, set on the first batch, kept to resume
    scales: dict[str, float] = field(default_factory=dict)


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


LATEST = "LATEST"


def store_checkpoint(src: Path, location: str) -> None:
    """Keep a fit's checkpoint at `location` (a path or a bucket prefix) so a restarted
    worker group, or a sweep restarted later, resumes it: locally by `publish`; in a bucket
    (no rename) as a new `step-N` prefix that a `LATEST` pointer names once it is whole."""
    if not storage.is_remote(location):
        publish(src, Path(location))
        return
    step = json.loads((src / STATE).read_text())["step"]
    name = f"step-{step:09d}"
    storage.upload(src, storage.join(location, name))
    old = (
        storage.read_bytes(storage.join(location, LATEST)).decode()
        if storage.is_file(storage.join(location, LATEST))
        else None
    )
    storage.write_bytes(storage.join(location, LATEST), name.encode())
    if old and old != name:
        storage.remove(storage.join(location, old))


def stored_checkpoint(location: str) -> Path | None:
    """The checkpoint `store_checkpoint` kept at `location`, on this node's disk, or None."""
    if not storage.is_remote(location):
        path = Path(location)
        return path if (path / STATE).is_file() else None
    pointer = storage.join(location, LATEST)
    if not storage.is_file(pointer):
        return None
    return storage.local_copy(storage.join(location, storage.read_bytes(pointer).decode()))


# ---------------------------------------------------------------- worker


def truncate_log(path: Path, step: int) -> None:
    """Drop log rows past the checkpoint a resume starts from: those steps train again."""
    if path.is_file():
        rows = [r for r in path.read_text().splitlines() if json.loads(r)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))
