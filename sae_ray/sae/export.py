"""An SAE as a SAELens folder (`cfg.json` + `sae_weights.safetensors`), so that
`sae_lens.SAE.load_from_disk(folder)` loads it and encodes as we do.

TopK stays TopK. BatchTopK and Matryoshka are saved as SAELens saves its own: a JumpReLU
whose threshold is the learned inference threshold, for every latent. A JumpReLU carries
its per-latent thresholds. (SAELens' sparsify loader wants `layers.N` folder names and
bfloat16, so we write its native layout rather than rely on it.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sae_ray.sae.model import SparseAutoencoder

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"


def saelens_config(sae: SparseAutoencoder, metadata: dict[str, Any] | None = None) -> dict:
    cfg = sae.cfg
    name, extra, _ = sae.arch.saelens(sae)
    out: dict[str, Any] = {
        "architecture": name,
        "d_in": cfg.d_in,
        "d_sae": cfg.num_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": metadata or {},
        **extra,
    }
    return out


@torch.no_grad()
def export_saelens(
    sae: SparseAutoencoder, out: Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Write `sae` to `out` in SAELens' layout; `metadata` (hook name, model, ...) goes into
    its config as SAELens keeps it. Returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "W_enc": sae.encoder.weight.T,
        "b_enc": sae.encoder.bias,
        "W_dec": sae.W_dec,
        "b_dec": sae.b_dec,
    }
    state.update(sae.arch.saelens(sae)[2])  # a threshold, for all but TopK
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS))
    (out / CFG).write_text(json.dumps(saelens_config(sae, metadata), indent=1))
    return out


def export_run(run_dir: Path | str, out: Path | str) -> list[Path]:
    """Every SAE of a `train-sae` run (or a sweep's SAE artifact) under `run_dir`, each
    folder holding `cfg.json` + `sae.safetensors`, to the same relative folder under `out`
    in SAELens' layout. Returns the folders written."""
    run_dir, out, written = Path(run_dir), Path(out), []
    for weights in sorted(Path(run_dir).rglob("sae.safetensors")):
        folder = weights.parent
        sae = SparseAutoencoder.load(folder)
        written.append(export_saelens(sae, out / folder.relative_to(run_dir)))
    return written
