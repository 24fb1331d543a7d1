"""The subcommands that read what a sweep or a fit wrote: report, intervene, plan,
export-saelens, and the extras after a sweep (report, W&B summary run)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from sae_ray import config as config_mod
from sae_ray import storage
from sae_ray.cli import preflight
from sae_ray.config import Config, ConfigError


def print_outcome(cfg: Config, rows: list[dict[str, Any]]) -> None:
    from sae_ray.sweep.results import best_summary, summary_table

    params = list(cfg.search.space)
    goals = cfg.search.goals()
    print(f"\nresults: {storage.join(cfg.sweep_uri, 'results.csv')}")
    print(summary_table(rows, params, goals[0].key))
    summary = best_summary(rows, cfg)

    def describe(entry: dict[str, Any]) -> str:
        chosen = ", ".join(f"{p}={v}" for p, v in entry["params"].items()) or "fixed config"
        scores = ", ".join(f"{k}={v:.4g}" for k, v in entry["objectives"].items())
        return f"{entry['trial_id']} ({chosen}) {scores}"

    if "pareto_front" in summary:
        print(f"\nPareto front ({len(summary['pareto_front'])} trials):")
        for entry in summary["pareto_front"]:
            print(f"  {describe(entry)}")
    elif summary["best"] is None:
        print("\nno trial completed feasibly")
    else:
        print(f"\nbest trial: {describe(summary['best'])}")


def intervene(args: argparse.Namespace) -> int:
    """`sae-ray intervene`: the intervention curve of each SAE of a cycle, as CSV and PNG,
    and per SAE the lowest k_sharp under the degradation bound."""
    import pandas as pd

    from sae_ray.method.intervene import curves, lowest_k_sharp
    from sae_ray.sweep.figures import plot_intervention

    try:
        ks = sorted({int(k) for k in args.k_sharp.split(",") if k.strip()})
    except ValueError:
        raise ConfigError(f"--k_sharp: {args.k_sharp!r} is not a list of integers") from None
    if not ks or ks[0] < 1:
        raise ConfigError(f"--k_sharp: {args.k_sharp!r}: give positive integers")
    target = Path(args.target)
    if target.is_dir():
        if not (target / "config.yaml").is_file():
            raise ConfigError(f"{target}: no config.yaml (is it a sweep's directory?)")
        cfg = config_mod.load(target / "config.yaml", args.overrides)
    else:
        cfg = config_mod.load(args.target, args.overrides)
    rows = curves(cfg, ks, args.cycle)
    out = Path(args.out) if args.out else cfg.sweep_dir / "intervene"
    out.mkdir(parents=True, exist_ok=True)
    csv = out / f"cycle{args.cycle}.csv"
    pd.DataFrame(rows).astype({"k_sharp": "Int64"}).to_csv(csv, index=False)
    png = out / plot_intervention(
        rows, out / f"cycle{args.cycle}.png", f"{cfg.experiment.name}: cycle {args.cycle}"
    )
    print(f"intervention curve: {csv}\nplot: {png}")
    bound = args.max_degradation_pct
    for sae, k in lowest_k_sharp(rows, bound).items():
        verdict = f"k_sharp={k}" if k is not None else f"none of {ks}"
        print(f"SAE {sae[:12]}: lowest k_sharp within {bound:g}% of clean perplexity: {verdict}")
    return 0


def export_saelens(run_dir: str, out: str, push_to: str | None = None) -> int:
    """`sae-ray export-saelens RUN OUT [--push REPO_ID]`: every SAE under RUN (each folder
    holding `cfg.json` + `sae.safetensors`) as a SAELens folder with its model card at the
    same relative path; with `push_to`, uploaded to that hub repository."""
    from sae_ray.sae.export import check_exportable, export_run, push

    source = Path(run_dir)
    if not source.is_dir():
        raise ConfigError(f"{run_dir}: no such directory")
    if not any(source.rglob("sae.safetensors")):
        raise ConfigError(f"{run_dir}: no SAE checkpoint (sae.safetensors) under it")
    if Path(out).resolve().is_relative_to(source.resolve()):
        raise ConfigError(f"{out}: inside {run_dir}; export somewhere else")
    if push_to is not None:
        _check_push(push_to)
    try:
        check_exportable(source)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for folder in export_run(source, out):
        print(f"SAELens folder: {folder}")
    if push_to is not None:
        print(f"pushed: {push(Path(out), push_to)}")
    return 0


def _check_push(repo_id: str) -> None:
    """A repository id the hub accepts and a token to write with, before anything is
    written (no request is made)."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(f"--push: {repo_id!r} is not a hub repository id ({err})") from None
    if "/" not in repo_id:
        raise ConfigError(f"--push: {repo_id!r}: name it OWNER/NAME")
    if not get_token():
        raise ConfigError("--push: no Hugging Face token: set HF_TOKEN or run `hf auth login`")


def plan(cfg: Config) -> int:
    """`sae-ray plan`: the whole memory plan, then its verdict (exit 2 when a stage won't fit).
    Only evaluation's codes and pooled activations depend on the dataset's size: a dataset
    that does not load (the hub unreachable) is planned at its configured size, said so."""
    if cfg.ground_truth:
        print(_ground_truth_plan(cfg))
        return 0
    try:
        examples, assumed = preflight.check_dataset(cfg), None
    except ConfigError as err:
        examples = cfg.dataset.max_examples or cfg.dataset.num_examples
        assumed = (
            f"note: evaluation planned for {examples} examples; the dataset did not load ({err})"
        )
    memory = preflight.memory_plan(cfg, examples)
    if assumed:
        print(assumed)
    if memory is None:
        print(f"{cfg.model.name}: its config cannot be read offline, so its size is unknown")
        return 0
    print("\n".join(memory.lines()))
    memory.check()  # a ConfigError: the caller prints it and exits 2
    print("fits" if memory.device_gb else "set resources.gpu_memory_gb to check it against a GPU")
    return 0


def _ground_truth_plan(cfg: Config) -> str:
    """A ground-truth sweep has no model: what its world's draws and its largest SAE take."""
    from sae_ray.sae.feeds import MATERIALIZE_BYTES

    s = cfg.synthetic
    stored = s.train_samples * s.hidden_dim * 4
    latents = max(
        cfg.sae.model_copy(update={"num_latents": n}).latents_for(s.hidden_dim)
        for n in preflight.searched_values(cfg, "sae.num_latents", cfg.sae.num_latents)
    )
    sae = (2 * s.hidden_dim * latents + latents + s.hidden_dim) * 4 * 4  # weights, grads, Adam
    held = "held in each worker" if stored <= MATERIALIZE_BYTES else "streamed by each worker"
    held = "streamed by Ray Data" if cfg.sae.feed == "ray_data" else held
    return (
        f"ground truth ({cfg.dataset.name}): no model. The world's {s.train_samples:,} draws "
        f"x {s.hidden_dim} dims: {stored / 2**30:.2f} GiB stored, {held}; the largest SAE "
        f"({latents} latents) with its gradients and Adam: {sae / 2**20:.1f} MB per worker"
    )


def after_sweep(cfg: Config, rows: list[dict[str, Any]]) -> None:
    """The report and W&B summary run: extras once results.csv is written, so a failure in
    either is a warning, never a failed sweep."""
    try:
        pages = report(cfg.sweep_uri, None)
    except Exception as err:  # noqa: BLE001
        logging.getLogger(__name__).warning("report not written: %s", err)
        pages = None
    _wandb_summary(cfg, rows, pages)


def _wandb_summary(cfg: Config, rows: list[dict[str, Any]], pages: Path | None) -> None:
    if cfg.wandb.mode == "disabled":
        return
    from sae_ray.sweep.wandb_log import log_summary

    try:
        print(f"W&B summary run: {log_summary(cfg, rows, pages)}")
    except Exception as err:  # noqa: BLE001 - the results are already written
        logging.getLogger(__name__).warning("W&B summary run not written: %s", err)


def report(sweep: str, out: str | None) -> Path:
    from sae_ray.sweep.report import build_report

    index, pages = build_report(sweep, out)
    print(f"report: {index}")
    return pages
