"""Rank 0's log of an SAE fit: a progress bar, W&B, and `<save_dir>/metrics.jsonl`, with
sparsify's keys (`fvu/<hookpoint>`, `fvu/<variant>/<hookpoint>` for co-trained SAEs)."""

from __future__ import annotations

import json

from sae_ray import telemetry
from sae_ray.sae.decoder import mean_max_decoder_cos
from sae_ray.sae.fit import Fit


class RunLog:
    """Rank 0's view of the run: a progress bar, W&B, and `<save_dir>/metrics.jsonl`."""

    def __init__(self, fit: Fit, wandb_dir: str | None):
        cfg, self.bar, self.wandb_run = fit.cfg, None, None
        if fit.rank == 0 and cfg.progress:
            from ray.experimental.tqdm_ray import tqdm

            self.bar = tqdm(total=fit.budget, desc=cfg.run_name, unit="tok")
            self.bar.update(fit.progress.tokens)
        if fit.rank == 0 and cfg.log_to_wandb:
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.wandb_project,
                name=cfg.run_name,
                config=cfg.model_dump(),
                dir=wandb_dir,
                resume="allow",
                settings=wandb.Settings(quiet=True),
            )

    def tokens(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def row(self, fit: Fit, epoch: int) -> None:
        """sparsify-style keys (`fvu/<hookpoint>`), all on the TopK codes."""
        cfg, rate = fit.cfg, fit.rate()
        row = {"step": fit.progress.step, "tokens": fit.progress.tokens, "epoch": epoch}
        for hp, s in fit.stats.items():
            row.update({f"{name}/{hp}": s[name] for name in LOGGED})
            row[f"mean_max_decoder_cos/{hp}"] = mean_max_decoder_cos(fit.saes[hp].W_dec)
        row["tokens_per_s"] = rate
        for key in fit.saes:
            telemetry.sae_tokens_per_s(cfg.sweep or cfg.run_name, key, rate)
        if self.bar is not None:
            fvu, dead = (row[f"{m}/{next(iter(fit.saes))}"] for m in ("fvu", "dead_pct"))
            self.bar.set_description(f"{cfg.run_name} fvu {fvu:.3f} dead {dead:.0f}%")
        if self.wandb_run is not None:
            self.wandb_run.log(row, step=fit.progress.step)
        if fit.save_dir is not None:
            fit.save_dir.mkdir(parents=True, exist_ok=True)
            with (fit.save_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


LOGGED = ("loss", "fvu", "auxk", "l0", "dead_pct")
