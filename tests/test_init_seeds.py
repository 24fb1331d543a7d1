"""Several init seeds: one SAE per seed on one stream (a co-trained variant each), each
bit for bit the SAE that seed trains alone; `train-sae --init_seeds 1 2` makes them."""

from __future__ import annotations

import torch

from sae_ray.cli.parser import parser
from sae_ray.cli.train_sae import check_flags
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.trainer import fit_in_process


def _cfg(**extra) -> SaeTrainConfig:
    base = {"hookpoints": ["h"], "d_in": 16, "k": 4, "expansion_factor": 4, "batch_size": 128}
    return SaeTrainConfig(**base, epochs=2, lr=3e-3, progress=False, **extra)


def test_each_seeds_sae_equals_its_solo_fit_bit_for_bit():
    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(0))
    together = fit_in_process({"h": x}, _cfg(variants=[{"init_seed": 1}, {"init_seed": 2}]))
    assert sorted(together.saes) == ["seed1/h", "seed2/h"]
    one, two = (together.saes[f"seed{s}/h"].state_dict() for s in (1, 2))
    assert not torch.equal(one["W_dec"], two["W_dec"])  # different SAEs
    for seed in (1, 2):
        alone = fit_in_process({"h": x}, _cfg(init_seed=seed)).saes["h"].state_dict()
        mine = together.saes[f"seed{seed}/h"].state_dict()
        for name, value in alone.items():
            assert torch.equal(mine[name], value), (seed, name)


def test_train_sae_flag_makes_one_variant_per_seed_and_setting():
    args = parser().parse_args(["train-sae", "m", "d", "--k", "4", "8", "--init_seeds", "1", "2"])
    _, variants = check_flags(args)
    assert variants == [
        {"k": 4, "init_seed": 1},
        {"k": 4, "init_seed": 2},
        {"k": 8, "init_seed": 1},
        {"k": 8, "init_seed": 2},
    ]
