"""The sweep YAML's `synthetic` section: the ground-truth world of `dataset.name:
synthetic:synthsae`, SAELens's synthetic generator (`sae_lens.synthetic`) on
SynthSAEBench-16k's recipe (Zipfian firing, a hierarchy of mutually exclusive children,
low-rank correlations, orthogonalised features, magnitudes falling with frequency) at the
size set here. `sweeps/synthsae_16k.yaml` is the published size, `sweeps/synthsae.yaml` a
reduced one."""

from __future__ import annotations

from pydantic import Field

from sae_ray.config.base import Section

GROUND_TRUTH = "synthetic:synthsae"


class Synthetic(Section):
    num_features: int = Field(1024, ge=16, description="true features (SynthSAEBench-16k: 16384)")
    hidden_dim: int = Field(
        128, ge=4, description="dimensions they are superposed in (SynthSAEBench-16k: 768)"
    )
    root_nodes: int = Field(
        8,
        ge=1,
        description="roots of the feature hierarchy, each with children 4 wide and 3 deep "
        "(SynthSAEBench-16k: 128)",
    )
    train_samples: int = Field(
        200_000, ge=1000, description="activations drawn to train each SAE on (the paper: 200M)"
    )
    eval_samples: int = Field(
        20_000, ge=1000, description="fresh activations the SAE is scored on (the paper: 500k)"
    )
    seed: int = Field(
        42, ge=0, description="the world's seed: its features and its samples, one per sweep"
    )
