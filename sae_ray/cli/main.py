"""`sae-ray`: sweep, run, report, train-sae.

Bad input ends in one line on stderr naming the field or file and exit code 2; a
traceback is for bugs, not for typos in a YAML file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from sae_ray import config as config_mod
from sae_ray import storage
from sae_ray.cli import preflight
from sae_ray.config import Config, ConfigError

EXIT_BAD_INPUT = 2


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join (default: RAY_ADDRESS, else a local one)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's and the workers' own logs on the console",
    )


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as the one line every other bad input gets (argparse would
    print its whole usage block first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        missing = message.removeprefix("the following arguments are required: ")
        if missing != message:
            name = missing.split(", ")[0]
            message = f"{name}: required (see `{self.prog} --help`)"
        raise ConfigError(message.removeprefix("argument "))


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sae-ray", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    from sae_ray.cli import train_sae

    p = sub.add_parser(
        "train-sae",
        help="train SAEs on a model's layers (the saetrain tool's flags)",
        description=train_sae.__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train_sae.add_arguments(p)
    _address(p)
    p = sub.add_parser(
        "report",
        help="write SWEEP/report/index.html and its plots from a sweep's results",
    )
    p.add_argument("sweep_dir", help="the sweep's directory or bucket URI, e.g. runs/quickstart")
    p.add_argument("--out", help="write the report here instead of SWEEP/report")
    p = sub.add_parser(
        "intervene",
        help="causal_lm: perplexity with the layer replaced by sharpened SAE reconstructions",
    )
    p.add_argument("target", help="the sweep's directory (runs/cpt_quickstart) or its YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides of a YAML target")
    p.add_argument("--k_sharp", default="1,2,4,8", help="comma-separated latents kept per token")
    p.add_argument("--cycle", type=int, default=0, help="whose SAEs (cycle 0: the first)")
    p.add_argument(
        "--max_degradation_pct",
        type=float,
        default=2.0,
        help="the bound the lowest k_sharp is chosen under (perplexity rise over clean, %%)",
    )
    p.add_argument("--out", help="CSV and PNG go here (default SWEEP/intervene)")
    for name, help_text in (
        ("sweep", "run a Ray Tune + Optuna sweep from a YAML file"),
        ("run", "run one trial with the YAML's fixed values"),
        ("plan", "print each stage's memory per worker and refuse what won't fit (no Ray)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("sweep_file", help="sweep YAML, e.g. sweeps/quickstart.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sae.k=16")
        if name != "plan":
            _address(p)
        if name == "sweep":
            p.add_argument(
                "--resume",
                action="store_true",
                help="finish an interrupted sweep: unfinished trials run on, finished ones stay",
            )
    return parser


def _connect(address: str | None, verbose: bool = False) -> None:
    """Start or join Ray. The console is for people: unless `verbose`, the workers' and
    Ray's own output (worker-group start-ups, every Train report, Ray Data plans, raylet
    warnings, Tune's banner) stays in Ray's log files (`/tmp/ray/session_latest/logs`, the
    dashboard's Logs page)."""
    import ray

    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the engine that honours verbose=0
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        _raylet_notes_to_log()
    if not ray.is_initialized():
        ray.init(
            address=address,
            log_to_driver=verbose,
            configure_logging=False,
            logging_config=ray.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        )
    if not verbose:
        import ray.data  # configures its loggers: keep their files, quiet their console

        for handler in logging.getLogger("ray.data").handlers:  # its notes go to ray-data.log
            if "File" not in type(handler).__name__:
                handler.setLevel(logging.ERROR)
        # Tune's "the callbacks took 2 s, which may be a performance bottleneck" notes
        logging.getLogger("ray.tune.utils.util").setLevel(logging.ERROR)


def _raylet_notes_to_log() -> None:
    """Ray pushes raylet notes ("N PYTHON worker processes have been started ...") to every
    driver's console whatever `log_to_driver` says; send them to the log instead. Ray's
    private printer is wrapped only if it is there with the expected shape."""
    from ray._private import worker

    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "_sae_ray", False):
        return

    def quiet(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            logging.getLogger("ray").debug("raylet: %s", " ".join(data.get("lines", [])))
            return
        printer(data, ignore_prefix)

    quiet._sae_ray = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = quiet


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


def _print_outcome(cfg: Config, rows: list[dict[str, Any]]) -> None:
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


def _run_one(cfg: Config) -> list[dict[str, Any]]:
    from sae_ray.method.trial_run import run_trial
    from sae_ray.sweep.results import write_config, write_outputs
    from sae_ray.sweep.tuner import objective_reporter

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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sae-ray")
    except PackageNotFoundError:  # a checkout on sys.path, not installed
        return "unknown"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; dotted overrides may also come after a flag (`sweep FILE --resume
    sae.k=16`), which argparse alone refuses once its positionals are consumed."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    late = [t for t in extra if "=" in t and not t.startswith("-")]
    if late and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *late]
        extra = [t for t in extra if t not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # Our INFO lines, and only warnings from the libraries (tensorboardX, optuna, ...).
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sae_ray").setLevel(logging.INFO)
    if args.command == "train-sae":
        from sae_ray.cli import train_sae

        try:
            train_sae.check_flags(args)
            train_sae.run(args, connect=lambda: _connect(args.address, args.verbose))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return 0
    if args.command == "report":
        try:
            _report(args.sweep_dir, args.out)
        except (FileNotFoundError, ConfigError) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except OSError as err:  # an unreachable bucket, an --out that cannot be written
            reason = (getattr(err, "strerror", None) or str(err)).strip().splitlines()[0]
            where = args.out if args.out and err.filename is None else err.filename
            print(f"error: {where or args.sweep_dir}: {reason}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return 0
    if args.command == "intervene":
        try:
            return _intervene(args)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        cfg = config_mod.load(args.sweep_file, args.overrides)
        if args.command == "plan":
            return _plan(cfg)
        _warn_if_inside_job(cfg)
        if args.command == "sweep":
            from sae_ray.sweep.tuner import (
                check_resumable,
                max_concurrent_trials,
                run_sweep,
                search_space,
                with_control,
            )

            search_space(cfg)  # refuse an empty space before starting Ray
            cfg = with_control(cfg)
            plan = preflight.check(cfg)
            if args.resume:
                check_resumable(cfg)
            _print_plan(plan)  # every check passed: what follows is the sweep
            _connect(args.address, args.verbose)
            import ray

            max_concurrent_trials(cfg, ray.cluster_resources())
            rows = run_sweep(cfg, resume=args.resume)
        else:
            _print_plan(preflight.check(cfg))
            _connect(args.address, args.verbose)
            rows = _run_one(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _print_outcome(cfg, rows)
    if args.command == "sweep":
        _after_sweep(cfg, rows)
    return 0


def _intervene(args: argparse.Namespace) -> int:
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


def _plan(cfg: Config) -> int:
    """`sae-ray plan`: the whole memory plan, then its verdict (exit 2 when a stage won't fit)."""
    plan = preflight.memory_plan(cfg, preflight.check_dataset(cfg))
    if plan is None:
        print(f"{cfg.model.name}: its config cannot be read offline, so its size is unknown")
        return 0
    print("\n".join(plan.lines()))
    plan.check()  # a ConfigError: the caller prints it and exits 2
    print("fits" if plan.device_gb else "set resources.gpu_memory_gb to check it against a GPU")
    return 0


def _print_plan(plan) -> None:
    if plan is not None:
        print(plan.summary())


def _after_sweep(cfg: Config, rows: list[dict[str, Any]]) -> None:
    """The report and W&B summary run: extras once results.csv is written, so a failure in
    either is a warning, never a failed sweep."""
    try:
        pages = _report(cfg.sweep_uri, None)
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


def _report(sweep: str, out: str | None) -> Path:
    from sae_ray.sweep.report import build_report

    index, pages = build_report(sweep, out)
    print(f"report: {index}")
    return pages


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
