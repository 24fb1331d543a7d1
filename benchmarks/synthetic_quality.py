"""Ground truth: our SAE trainer against SAELens' own on activations with known features
(`sae_lens.synthetic`, SynthSAEBench's recipe scaled down), for each architecture both
have. Targets: MCC ratio (ours / SAELens) >= 1.0 and tokens/s ratio >= 2, per architecture.

The synthetic model (fixed seed): `--features` true features in `--hidden` dimensions, Zipf
firing probabilities, a two-level hierarchy and low-rank correlations. Both trainers see
fresh samples from its generator (ours through a feed of the same batches as its trainer
takes from storage), at the same width, k, token budget, batch size and learning rate
(ours otherwise at our defaults, SAELens' at `train_toy_sae`'s; a JumpReLU is asked for
L0 = k on both sides, by `target_l0`: ours, and SAELens' "quadratic" sparsity mode; each
side's L0 at the end is in the line's config). Both SAEs are then scored
by SAELens' `eval_sae_on_synthetic_data` on the same held-out samples: ours exported to
SAELens' layout and loaded by `SAE.load_from_disk`, SAELens' saved as its inference model
and loaded the same way (BatchTopK and Matryoshka become JumpReLUs in both). tokens/s is
the budget over each trainer's wall time less the time drawing the budget's batches from
the generator takes (measured once, the same on both sides: at these sizes sampling the
correlated, hierarchical features costs about what a TopK step does); the line's config
also gives the ratio with sampling left in.

    python -m benchmarks.synthetic_quality                       # 4096 features, 1M tokens
    python -m benchmarks.synthetic_quality --tokens 100000 --architectures topk
    python -m benchmarks.synthetic_quality --lr_warmup_steps 100 --lr_decay cosine --normalize
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks.common import device_name, emit, one_pass_fit
from sae_ray.sae.export import export_saelens
from sae_ray.sae.feeds import ActivationFeed
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.trainer import fit_saes

warnings.filterwarnings("ignore")  # SAELens' deprecation and config notes


def synthetic_model(features: int, hidden: int, seed: int = 0):
    import sae_lens.synthetic as syn

    return syn.SyntheticModel(
        syn.SyntheticModelConfig(
            num_features=features,
            hidden_dim=hidden,
            firing_probability=syn.ZipfianFiringProbabilityConfig(
                exponent=0.5, max_prob=0.3, min_prob=0.002
            ),
            hierarchy=syn.HierarchyConfig(
                total_root_nodes=features // 16, branching_factor=4, max_depth=2
            ),
            correlation=syn.LowRankCorrelationConfig(rank=16, correlation_scale=0.1),
            seed=seed,
        )
    )


class SyntheticFeed(ActivationFeed):
    """Fresh samples from the synthetic model, `rows` of them an epoch, in batches."""

    def __init__(self, cfg: SaeTrainConfig, world: int, device, model, rows: int):
        super().__init__(cfg, world, device)
        self.model, self.rows = model, rows

    def batches(self, shard, epoch: int):
        for _ in range(self.rows // self.cfg.batch_size):
            yield {"h": self.model.sample(self.cfg.batch_size).to(self.device)}


def train_ours(model, arch: str, args, out: Path) -> float:
    """Our trainer in this process; returns its wall seconds. The SAE lands in `out`."""
    torch.manual_seed(1)
    cfg = one_pass_fit(
        "h",
        args.hidden,
        args.batch,
        num_latents=args.width,
        k=args.k,
        architecture=arch,
        lr=args.lr,
        target_l0=args.k if arch == "jumprelu" else None,
        lr_warmup_steps=args.lr_warmup_steps,
        lr_decay=args.lr_decay,
        lr_end_factor=args.lr_end_factor,
        normalize_activations=args.normalize,
    )
    config = {
        "cfg": cfg.model_dump(),
        "rows": args.tokens,
        "feed": lambda c, world, device: SyntheticFeed(c, world, device, model, args.tokens),
    }
    start = time.perf_counter()
    fit = fit_saes(config, None, None, lambda fit: None)
    wall = time.perf_counter() - start
    export_saelens(fit.published()["h"].eval(), out)  # normalised: the scale folded in
    return wall


def train_theirs(model, arch: str, args, out: Path) -> float:
    """SAELens' `train_toy_sae` on the same generator; its inference model lands in `out`."""
    import sae_lens
    import sae_lens.synthetic as syn

    torch.manual_seed(1)
    common = {"d_in": args.hidden, "d_sae": args.width}
    if arch == "jumprelu":
        sae = sae_lens.JumpReLUTrainingSAE(  # its own way to ask for L0 = k (Gemma Scope 2)
            sae_lens.JumpReLUTrainingSAEConfig(
                **common, jumprelu_sparsity_loss_mode="quadratic", target_l0=args.k
            )
        )
    elif arch == "matryoshka":
        widths = [args.width // 8, args.width // 4, args.width // 2, args.width]
        sae = sae_lens.MatryoshkaBatchTopKTrainingSAE(
            sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
                **common, k=args.k, matryoshka_widths=widths
            )
        )
    else:
        classes = {"topk": "TopK", "batchtopk": "BatchTopK"}
        name = classes[arch]
        config = getattr(sae_lens, f"{name}TrainingSAEConfig")(**common, k=args.k)
        sae = getattr(sae_lens, f"{name}TrainingSAE")(config)
    start = time.perf_counter()
    syn.train_toy_sae(
        sae,
        model.feature_dict,
        model.activation_generator,
        training_samples=args.tokens,
        batch_size=args.batch,
        lr=args.lr,
    )
    wall = time.perf_counter() - start
    sae.save_inference_model(str(out))
    return wall


def score(model, folder: Path, samples: int) -> dict[str, float]:
    """SAELens' own evaluation of the SAE saved in `folder` (same samples for both)."""
    import sae_lens
    import sae_lens.synthetic as syn

    sae = sae_lens.SAE.load_from_disk(str(folder))
    torch.manual_seed(2)
    result = syn.eval_sae_on_synthetic_data(
        sae, model.feature_dict, model.activation_generator, num_samples=samples
    )
    keep = ("mcc", "explained_variance", "sae_l0", "true_l0", "dead_latents", "uniqueness")
    return {k: round(float(getattr(result, k)), 4) for k in keep}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--width", type=int, default=4096, help="the SAEs' latents")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=3e-4, help="both trainers'")
    parser.add_argument("--eval_samples", type=int, default=20_000)
    # our recipe options (SAELens's side trains as it always does)
    parser.add_argument("--lr_warmup_steps", type=int, default=0, help="ours: lr warm-up")
    parser.add_argument("--lr_decay", default="constant", choices=["constant", "linear", "cosine"])
    parser.add_argument("--lr_end_factor", type=float, default=0.0, help="ours: decay's end")
    parser.add_argument("--normalize", action="store_true", help="ours: E‖x‖ = √d")
    parser.add_argument(
        "--architectures", nargs="+", default=["topk", "batchtopk", "jumprelu", "matryoshka"]
    )
    args = parser.parse_args(argv)
    model = synthetic_model(args.features, args.hidden)
    start = time.perf_counter()
    for _ in range(args.tokens // args.batch):
        model.sample(args.batch)
    sample_s = time.perf_counter() - start
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.architectures:
            ours_wall = train_ours(model, arch, args, Path(tmp) / f"ours-{arch}")
            theirs_wall = train_theirs(model, arch, args, Path(tmp) / f"theirs-{arch}")
            ours, theirs = (
                score(model, Path(tmp) / f"{s}-{arch}", args.eval_samples)
                for s in ("ours", "theirs")
            )
            config = {
                "features": args.features,
                "hidden": args.hidden,
                "width": args.width,
                "k": args.k,
                "tokens": args.tokens,
                "batch": args.batch,
                "lr": args.lr,
                "ours_recipe": {
                    "lr_warmup_steps": args.lr_warmup_steps,
                    "lr_decay": args.lr_decay,
                    "lr_end_factor": args.lr_end_factor,
                    "normalize": args.normalize,
                },
                "ours": ours,
                "sae_lens": theirs,
            }
            lines.append(
                emit(
                    f"synthetic_quality_mcc_{arch}",
                    ours["mcc"],
                    theirs["mcc"],
                    target=1.0,
                    better="higher",
                    sides=("sae-ray", "SAELens"),
                    config=config,
                    device=device_name("cpu"),
                )
            )
            speed = {k: v for k, v in config.items() if k not in ("ours", "sae_lens")}
            speed["sampling_s"] = round(sample_s, 1)
            speed["wall_s"] = {"ours": round(ours_wall, 1), "sae_lens": round(theirs_wall, 1)}
            speed["ratio_with_sampling"] = round(theirs_wall / ours_wall, 3)
            lines.append(
                emit(
                    f"synthetic_quality_tokens_per_s_{arch}",
                    args.tokens / max(ours_wall - sample_s, 1e-9),
                    args.tokens / max(theirs_wall - sample_s, 1e-9),
                    target=2.0,
                    better="higher",
                    unit="tokens/s",
                    sides=("sae-ray", "SAELens"),
                    config=speed,
                    device=device_name("cpu"),
                )
            )
    return lines


if __name__ == "__main__":
    main()
