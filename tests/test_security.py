"""Nothing a sweep reads from storage is unpickled by our code, checkpoints are safetensors,
and a W&B key in the environment never lands in anything the sweep writes or prints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import PLANTED_KEY, ROOT


def test_no_pickle_or_unsafe_torch_load_in_the_package():
    offenders = []
    modules = sorted((ROOT / "sae_ray").rglob("*.py"))
    assert len(modules) > 30  # every layer's modules, not only the top level's
    unpickling = (
        r"\bimport pickle\b|\bpickle\.|\bjoblib\b|\bdill\b|cloudpickle|read_pickle"
        r"|allow_pickle\s*=\s*True"
    )
    for path in modules:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(unpickling, code):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
            if (
                re.search(r"(?<!safetensors\.)torch\.load\(", code)
                and "weights_only=True" not in code
            ):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders


@pytest.mark.ray
def test_checkpoints_are_safetensors_only(quickstart_sweep):
    """Models and SAEs (the SAE trainer's checkpoints, optimizer state included, are checked
    by the fault test's resumed fit: they are removed once the SAE is published). Ray's own
    bookkeeping (tuner.pkl, params.pkl) is Tune's, read only by `--resume` of one's own sweep."""
    suffixes = (".bin", ".pt", ".pth", ".ckpt", ".safetensors", ".pkl", ".pickle", ".npy")
    suffixes += (".npz", ".joblib")
    weights = [
        p
        for p in quickstart_sweep.rglob("*")
        if p.is_file() and p.suffix in suffixes and not _tunes_own(p)
    ]
    assert any(p.parent.name.startswith("sae-") for p in weights)  # the SAEs are seen
    assert all(p.suffix == ".safetensors" for p in weights), sorted({p.suffix for p in weights})


def _tunes_own(path: Path) -> bool:
    """Tune's experiment state (`--resume` reads it): tuner.pkl, searcher-state-*.pkl and
    each trial's params.pkl."""
    return path.suffix == ".pkl" and (
        path.name in ("tuner.pkl", "params.pkl") or path.name.startswith("searcher-state-")
    )


@pytest.mark.ray
def test_a_planted_wandb_key_is_written_nowhere(quickstart_sweep):
    key = PLANTED_KEY.encode()
    workdir = quickstart_sweep.parents[1]  # the user's folder: the sweep and its console
    leaked = [
        str(p.relative_to(workdir))
        for p in workdir.rglob("*")
        if p.is_file() and key in p.read_bytes()
    ]
    assert not leaked, leaked
    assert (workdir / "console.log").stat().st_size > 0
    assert Path(quickstart_sweep / "results.csv").is_file()  # there was something to search
