"""A ground-truth trial (`dataset.name: synthetic:synthsae`): SAEs fitted on activations
drawn from a synthetic world whose features are known, and scored against them by
SAELens's own evaluation (`eval_sae_on_synthetic_data`: MCC, per-latent F1, precision,
recall, uniqueness, L0, shrinkage). No model, no cycles, no sharpening: one fit per seed,
reported as cycle 0. The world (its feature dictionary and the training draws) is one
artifact per sweep, every trial and seed fitting on the same activations, so co-training
(`cofit.py`) fits a grid's SAEs on one stream.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sae_ray.distributed.ranks import rank_world, shared_artifact
from sae_ray.lm.extraction import ShardWriter, vectors_to_arrow
from sae_ray.storage.artifacts import Artifact
from sae_ray.trial import sae_fit
from sae_ray.trial.stages import Trial

HOOKPOINT = "synthetic"  # the activations' one column
WORLD = "world"  # the artifact's folder holding the synthetic model
CHUNK = 65_536  # draws per batch from the generator
EVAL_BATCH = 8192  # draws per batch of the evaluation (its codes are dense)


def world_config(trial: Trial):
    """SynthSAEBench-16k's recipe (SAELens's `synth-sae-bench-16k` config) at the size
    the `synthetic` section sets."""
    from sae_lens.synthetic import (
        HierarchyConfig,
        LowRankCorrelationConfig,
        OrthogonalizationConfig,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
    )
    from sae_lens.synthetic.firing_magnitudes import (
        FoldedNormalMagnitudeConfig,
        LinearMagnitudeConfig,
    )

    s = trial.cfg.synthetic
    return SyntheticModelConfig(
        num_features=s.num_features,
        hidden_dim=s.hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(
            max_prob=0.4, min_prob=5e-4, exponent=0.5
        ),
        hierarchy=HierarchyConfig(
            total_root_nodes=s.root_nodes,
            branching_factor=4,
            max_depth=3,
            mutually_exclusive_portion=1.0,
            mutually_exclusive_min_depth=0,
            compensate_probabilities=True,
            scale_children_by_parent=True,
        ),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        correlation=LowRankCorrelationConfig(correlation_scale=0.1, rank=25),
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        bias=0.5,
        seed=s.seed,
    )


def world_activations(trial: Trial) -> Artifact:
    """The world (saved under WORLD) and `train_samples` draws from it as a token table
    (`train/tokens`, column HOOKPOINT), built by rank 0 once per sweep."""
    s = trial.cfg.synthetic
    spec = {"synthetic": s.model_dump(), "format": 1}

    def make(out: str, lead: bool) -> None:
        import torch
        from sae_lens.synthetic import SyntheticModel

        model = SyntheticModel(world_config(trial), device="cpu")
        model.save(Path(out) / WORLD)
        torch.manual_seed(s.seed)
        root = Path(out) / "train" / "tokens"
        writer = ShardWriter(root, "tokens", s.hidden_dim, "float32", columns=[HOOKPOINT])
        for start in range(0, s.train_samples, CHUNK):
            rows = min(CHUNK, s.train_samples - start)
            x = model.sample(rows).float().numpy()
            ids = pa.array(np.arange(start, start + rows))
            writer.write(pa.record_batch({"example_id": ids, HOOKPOINT: vectors_to_arrow(x)}))
        writer.close()

    return shared_artifact(trial.store, "activations", spec, make, everyone=False)


def scored(trial: Trial, world: Artifact, sae_art: Artifact) -> dict[str, Any]:
    """SAELens's evaluation of the SAE (exported to its format) on `eval_samples` fresh
    draws: `gt/...` metrics."""
    import torch
    from sae_lens import SAE
    from sae_lens.synthetic import SyntheticModel, eval_sae_on_synthetic_data

    from sae_ray.sae.export import export_saelens
    from sae_ray.sae.model import SparseAutoencoder

    s = trial.cfg.synthetic
    model = SyntheticModel.load_from_disk(world.local(WORLD), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        ours = SparseAutoencoder.load(sae_art.local())
        sae = SAE.load_from_disk(str(export_saelens(ours, Path(tmp))))
    torch.manual_seed(s.seed + 1)  # draws the SAE never trained on
    result = eval_sae_on_synthetic_data(
        sae, model.feature_dict, model.activation_generator, s.eval_samples, EVAL_BATCH
    )
    c = result.classification
    return {
        "gt/mcc": result.mcc,
        "gt/f1": c.f1_score,
        "gt/precision": c.precision,
        "gt/recall": c.recall,
        "gt/uniqueness": result.uniqueness,
        "gt/explained_variance": result.explained_variance,
        "gt/l0": result.sae_l0,
        "gt/true_l0": result.true_l0,
        "gt/dead_latents": float(result.dead_latents),
        "gt/shrinkage": result.shrinkage,
    }


def run_ground_truth(trial: Trial, report) -> None:
    """Each seed's SAE fitted on the world's draws and scored; reported once, as cycle 0,
    the mean over seeds with each seed's row (`run_cycles`' contract)."""
    from sae_ray.trial.cycle import cycle_metrics, timed

    times, rows = {}, []
    for seed in trial.seeds():
        seeded = trial.seeded(seed)
        with timed(times, "activations"):
            world = world_activations(seeded)
        with timed(times, "sae"):
            sae_art = sae_fit.fitted_sae(seeded, world, HOOKPOINT, 0)
        if rank_world()[0] == 0:
            with timed(times, "evaluate"):
                rows.append({"cycle": 0, "seed": seeded.sae_seed, **scored(seeded, world, sae_art)})
    report(0, cycle_metrics(rows, times, trial.store.computed))
