"""The `sae-ray` command line: every subcommand's flags, and argparse's errors as the one
line (exit 2) every other bad input gets."""

from __future__ import annotations

import argparse
import os

from sae_ray.config import ConfigError

DESCRIPTION = "sae-ray: sweep, run, report, train-sae, intervene, export-saelens, plan"


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


def parser() -> argparse.ArgumentParser:
    root = _Parser(prog="sae-ray", description=DESCRIPTION)
    root.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = root.add_subparsers(dest="command", required=True, parser_class=_Parser)
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
        "export-saelens",
        help="write every SAE under a folder in SAELens' layout (SAE.load_from_disk reads it)",
    )
    p.add_argument("run_dir", help="a train-sae run (output/NAME) or a sweep's SAE artifact")
    p.add_argument("out", help="the SAELens folders go here, each at its SAE's relative path")
    p.add_argument(
        "--push", metavar="REPO_ID", help="then upload OUT to this Hugging Face hub repository"
    )
    _intervene_flags(sub)
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
    return root


def _intervene_flags(sub) -> None:
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


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("sae-ray")
    except PackageNotFoundError:  # a checkout on sys.path, not installed
        return "unknown"


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; dotted overrides may also come after a flag (`sweep FILE --resume
    sae.k=16`), which argparse alone refuses once its positionals are consumed."""
    root = parser()
    args, extra = root.parse_known_args(argv)
    late = [t for t in extra if "=" in t and not t.startswith("-")]
    if late and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *late]
        extra = [t for t in extra if t not in late]
    if extra:
        root.error(f"unrecognized arguments: {' '.join(extra)}")
    return args
