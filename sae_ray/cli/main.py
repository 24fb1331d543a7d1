"""`sae-ray`: sweep, run, report, train-sae, intervene, export-saelens, plan.

Bad input ends in one line on stderr naming the field or file and exit code 2; a
traceback is for bugs, not for typos in a YAML file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from sae_ray import config as config_mod
from sae_ray import storage
from sae_ray.cli import commands, preflight
from sae_ray.cli.parser import parse
from sae_ray.cli.ray_session import connect as _connect
from sae_ray.config import Config, ConfigError

EXIT_BAD_INPUT = 2


def _warn_if_inside_job(cfg: Config) -> None:
    """A relative storage path in a submitted job resolves inside the job's uploaded working
    dir, a copy in Ray's temp folder that Ray cleans up: say so before the sweep runs."""
    job_dir = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and Path.cwd().resolve()
    uri = cfg.sweep_uri
    if job_dir and not storage.is_remote(uri) and Path(uri).is_relative_to(job_dir):
        print(
            f"warning: experiment.storage_path: results go to {uri}, inside this Ray job's "
            "uploaded working dir, which Ray deletes; pass an absolute path or a bucket "
            "(experiment.storage_path=/shared/runs or s3://bucket/runs)",
            file=sys.stderr,
        )


def _run_one(cfg: Config) -> list[dict[str, Any]]:
    from sae_ray.sweep.results import write_config, write_outputs
    from sae_ray.sweep.tuner import objective_reporter
    from sae_ray.trial.driver import run_trial

    rows: list[dict[str, Any]] = []

    def report(metrics: dict[str, Any]) -> None:
        fixed = {p: config_mod.get_dotted(cfg, p) for p in cfg.search.space}
        rows.append({"trial_id": "run", **fixed, **metrics, "status": "COMPLETE", "error": ""})
        print(
            f"cycle {metrics['cycle']}: "
            + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        )

    write_config(cfg)
    run_trial(cfg, objective_reporter(cfg.search, report))
    write_outputs(rows, cfg)
    return rows


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
    except ConfigError as err:
        return _bad_input(err)
    # Our INFO lines, and only warnings from the libraries (tensorboardX, optuna, ...).
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sae_ray").setLevel(logging.INFO)
    try:
        if args.command in ("sweep", "run", "plan"):
            return _sweep_file_command(args)
        return _tool_command(args)
    except ConfigError as err:
        return _bad_input(err)


def _bad_input(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _tool_command(args: argparse.Namespace) -> int:
    """The commands that do not take a sweep YAML."""
    if args.command == "train-sae":
        from sae_ray.cli import train_sae

        train_sae.check_flags(args)  # before the work's heavy imports: torch, Ray, transformers
        from sae_ray.cli import train_sae_run

        train_sae_run.run(args, connect=lambda: _connect(args.address, args.verbose))
        return 0
    if args.command == "intervene":
        return commands.intervene(args)
    if args.command == "export-saelens":
        return commands.export_saelens(args.run_dir, args.out, args.push)
    try:  # report
        commands.report(args.sweep_dir, args.out)
    except FileNotFoundError as err:
        return _bad_input(err)
    except OSError as err:  # an unreachable bucket, an --out that cannot be written
        reason = (getattr(err, "strerror", None) or str(err)).strip().splitlines()[0]
        where = args.out if args.out and err.filename is None else err.filename
        return _bad_input(Exception(f"{where or args.sweep_dir}: {reason}"))
    return 0


def _sweep_file_command(args: argparse.Namespace) -> int:
    """sweep, run and plan: every check before Ray starts, then the trials."""
    cfg = config_mod.load(args.sweep_file, args.overrides)
    if args.command == "plan":
        return commands.plan(cfg)
    _warn_if_inside_job(cfg)
    if args.command == "sweep":
        from sae_ray.sweep.space import drawn_ahead, search_space
        from sae_ray.sweep.tuner import (
            check_resumable,
            max_concurrent_trials,
            run_sweep,
            with_control,
        )

        search_space(cfg)  # refuse an empty space before starting Ray
        cfg = drawn_ahead(with_control(cfg))
        plan = preflight.check(cfg)
        if args.resume:
            check_resumable(cfg)
        _print_plan(plan)  # every check passed: what follows is the sweep
        _connect(args.address, args.verbose)
        from sae_ray.sweep import cluster

        preflight.check_cluster(cfg, cluster.nodes())
        max_concurrent_trials(cfg, cluster.capacity())
        rows = run_sweep(cfg, resume=args.resume)
    else:
        _print_plan(preflight.check(cfg))
        _connect(args.address, args.verbose)
        from sae_ray.sweep import cluster

        preflight.check_cluster(cfg, cluster.nodes())
        rows = _run_one(cfg)
    commands.print_outcome(cfg, rows)
    if args.command == "sweep":
        commands.after_sweep(cfg, rows)
    return 0


def _print_plan(plan) -> None:
    if plan is not None:
        print(plan.summary())


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
