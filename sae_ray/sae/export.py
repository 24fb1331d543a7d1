"""An SAE as a SAELens folder (`cfg.json` + `sae_weights.safetensors`), so that
`sae_lens.SAE.load_from_disk(folder)` loads it and encodes as we do.

TopK stays TopK. BatchTopK and Matryoshka are saved as SAELens saves its own: a JumpReLU
whose threshold is the learned inference threshold, for every latent. A JumpReLU carries
its per-latent thresholds. (SAELens' sparsify loader wants `layers.N` folder names and
bfloat16, so we write its native layout rather than rely on it.)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sae_ray.sae.archs import architecture
from sae_ray.sae.model import SaeConfig, SparseAutoencoder

CFG, WEIGHTS, CARD = "cfg.json", "sae_weights.safetensors", "README.md"


def saelens_name(cfg: SaeConfig) -> str:
    """SAELens's architecture for an SAE: its own, or for a transcoder the JumpReLU
    transcoder (skip or not) that BatchTopK, Matryoshka and JumpReLU all save as. ValueError
    for a TopK transcoder, which SAELens has no class for."""
    name = architecture(cfg.architecture).saelens_name
    if not cfg.transcode:
        return name
    if name != "jumprelu":
        raise ValueError(
            f"a {cfg.architecture} transcoder: SAELens has JumpReLU transcoders only; "
            "train it as batchtopk or jumprelu to export it"
        )
    return "jumprelu_skip_transcoder" if cfg.skip_connection else "jumprelu_transcoder"


def saelens_config(sae: SparseAutoencoder, metadata: dict[str, Any] | None = None) -> dict:
    cfg = sae.cfg
    extra, _ = sae.arch.saelens(sae)
    out: dict[str, Any] = {
        "architecture": saelens_name(cfg),
        "d_in": cfg.d_in,
        "d_sae": cfg.num_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not cfg.transcode,  # a transcoder's b_dec is the output's
        "normalize_activations": "none",
        "metadata": metadata or {},
        **extra,
    }
    if cfg.transcode:
        out["d_out"] = cfg.width_out
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
    state.update(sae.arch.saelens(sae)[1])  # a threshold, for all but TopK
    if sae.cfg.skip_connection:
        state["W_skip"] = sae.W_skip
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS))
    (out / CFG).write_text(json.dumps(saelens_config(sae, metadata), indent=1))
    return out


def check_exportable(run_dir: Path | str) -> None:
    """Every SAE under `run_dir` has a SAELens class (ValueError naming the first that has
    none), checked before anything is written."""
    for weights in sorted(Path(run_dir).rglob("sae.safetensors")):
        cfg = SaeConfig(**json.loads((weights.parent / "cfg.json").read_text()))
        try:
            saelens_name(cfg)
        except ValueError as err:
            raise ValueError(f"{weights.parent}: {err}") from None


def export_run(run_dir: Path | str, out: Path | str) -> list[Path]:
    """Every SAE of a `train-sae` run (or a sweep's SAE artifact) under `run_dir`, each
    folder holding `cfg.json` + `sae.safetensors`, to the same relative folder under `out`
    in SAELens' layout. Returns the folders written."""
    run_dir, out, written = Path(run_dir), Path(out), []
    for weights in sorted(Path(run_dir).rglob("sae.safetensors")):
        folder = weights.parent
        sae = SparseAutoencoder.load(folder)
        target = export_saelens(sae, out / folder.relative_to(run_dir))
        (target / CARD).write_text(model_card(sae, folder, run_dir))
        written.append(target)
    return written


def _json_near(folder: Path, top: Path, name: str) -> dict[str, Any]:
    """`name` in the SAE's folder or the nearest folder above it, up to `top`."""
    for where in [folder, *folder.parents]:
        if (where / name).is_file():
            return json.loads((where / name).read_text())
        if where == top:
            break
    return {}


def model_card(sae: SparseAutoencoder, folder: Path, top: Path) -> str:
    """A Hugging Face model card (README.md) for the SAE saved in `folder`: the SAELens
    library tag, its settings, how it was trained and its last metrics, from what the run
    left beside it (train-sae's `state.json` and log, a sweep artifact's `spec.json` and
    `train_metrics.json`)."""
    cfg = asdict(sae.cfg)
    progress = _json_near(folder, top, "state.json")
    metrics = _json_near(folder, top, "train_metrics.json")
    spec = _json_near(folder, top, "spec.json")
    log = folder.parent / "metrics.jsonl"
    if not metrics and log.is_file() and log.read_text().strip():
        metrics = json.loads(log.read_text().strip().splitlines()[-1])
    settings = {k: v for k, v in cfg.items() if v is not None}
    trained = {k: progress[k] for k in ("step", "tokens", "epoch") if k in progress}
    trained.update({k: spec[k] for k in ("parent", "seed", "workers") if k in spec})
    scores = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "/" not in k}
    scores.update({k: v for k, v in metrics.items() if k.startswith(("fvu/", "l0/", "dead_pct/"))})
    lines = [
        "---",
        "library_name: saelens",
        "tags: [sae_lens, sparse-autoencoder, sae-ray]",
        "---",
        "",
        f"# {cfg['architecture']} SAE: {folder.name}",
        "",
        "A sparse autoencoder trained with sae-ray, in SAELens' layout: "
        "`sae_lens.SAE.load_from_disk(folder)` (or `SAE.from_pretrained` once on the hub).",
    ]
    for title, table in (("Settings", settings), ("Training", trained), ("Metrics", scores)):
        if table:
            lines += ["", f"## {title}", "", "| | |", "| --- | --- |"]
            lines += [f"| {k} | {_cell(v)} |" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def push(out: Path, repo_id: str) -> str:
    """Upload the exported folders to the hub repository `repo_id` (made if missing)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(out), repo_id=repo_id, commit_message="sae-ray export")
    return f"https://huggingface.co/{repo_id}"
