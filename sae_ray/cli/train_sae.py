"""`sae-ray train-sae MODEL DATASET`: the saetrain tool's command line, on Ray.

The flags keep saetrain's names and meanings so its users' scripts carry over. One pass of
the model writes every requested layer's activations (Parquet, cached under
`<save_dir>/.activations`, keyed by what determines them); then one Ray Train run trains
an SAE per layer on them and checkpoints to `<save_dir>/<run_name>/<hookpoint>/`, the
layout sparsify and its readers load.
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any, Literal, get_args, get_origin

from pydantic import ValidationError

from sae_ray.config import PER_SAE, SHUFFLE_BUFFER_TOKENS, ConfigError, Sae, one_line


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _offered(field) -> dict:
    """How train-sae offers a field of the SAE config (`config.sae.saetrain`)."""
    return field.json_schema_extra or {}


def _flag_fields() -> dict[str, str]:
    """The SAE config's fields that are flags, and their flag names: the same names and
    meanings as the sweep's `sae` section, unless the field says otherwise."""
    out = {}
    for name, field in Sae.model_fields.items():
        flag = _offered(field).get("flag", name)
        if flag is not None:
            out[name] = flag
    return out


def _sae_flags(group: argparse._ArgumentGroup) -> None:
    for name, flag in _flag_fields().items():
        field = Sae.model_fields[name]
        kind = field.annotation
        options = get_args(kind)
        kwargs: dict = {"help": (field.description or name).replace("%", "%%")}
        if get_origin(kind) is Literal:
            kwargs["choices"] = list(options)
        elif get_origin(kind) is list:  # e.g. --exclude_tokens 0 50256
            kwargs.update(type=options[0], nargs="*")
        elif kind is bool:
            kwargs.update(type=_bool, nargs="?", const=True)
        else:
            kwargs["type"] = next((t for t in options if t is not type(None)), kind)
        default = _offered(field).get(
            "saetrain_default", field.get_default(call_default_factory=True)
        )
        if "type" in kwargs:
            kwargs["metavar"] = flag.upper()
        if name in PER_SAE:  # several values: one SAE each, all co-trained on one stream
            kwargs["nargs"] = "+"
            kwargs["help"] += " (several: one SAE each)"
        group.add_argument(f"--{flag}", dest=name, default=default, **kwargs)


def _sae_from_flags(args: argparse.Namespace) -> tuple[Sae, list[dict[str, Any]]]:
    """The SAE config the flags describe (each setting's first value) and the co-trained
    variants (the product of the settings given several values), every one validated
    before the model or Ray is touched."""
    values = {name: getattr(args, name) for name in _flag_fields()}
    lists = {n: v if isinstance(v, list) else [v] for n, v in values.items() if n in PER_SAE}
    base = {**values, **{n: v[0] for n, v in lists.items()}}
    several = {n: v for n, v in lists.items() if len(v) > 1}
    combos = itertools.product(*several.values()) if several else ()  # product() is [()]
    variants = [dict(zip(several, c, strict=True)) for c in combos]
    if len(args.init_seeds) > 1:  # each setting under each seed
        variants = [{**v, "init_seed": s} for v in variants or [{}] for s in args.init_seeds]
    batch = max(1, args.batch_size * args.ctx_len)
    try:
        sae = Sae(**base, batch_size=batch)
        for override in variants:
            Sae(**{**base, **_settings(override)}, batch_size=batch)
    except ValidationError as err:
        raise ConfigError(one_line(err, flag_of)) from None
    return sae, variants


def check_fits(sae: Sae, variants: list[dict[str, Any]], d_in: int) -> None:
    """k against the dictionary, for every co-trained SAE: one line naming `--k`."""
    try:
        for cfg in [sae] + [sae.model_copy(update=_settings(v)) for v in variants]:
            cfg.check_fits(d_in)
    except ValueError as err:
        raise ConfigError(f"--{err}") from None


def _settings(override: dict[str, Any]) -> dict[str, Any]:
    """A variant's SAE settings (its init seed is the fit's, not the SAE config's)."""
    return {k: v for k, v in override.items() if k != "init_seed"}


def flag_of(field: str) -> str:
    return f"--{_flag_fields().get(field, field)}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", nargs="?", help="hub id, local path, or a tiny preset (tiny-gpt2, tiny-bert)"
    )
    p.add_argument(
        "dataset", nargs="?", help="hub id[:subset], local file/dir, or synthetic:topics"
    )
    p.add_argument(
        "--activations",
        metavar="PATH",
        help="train on these activations instead of a model's (no MODEL DATASET): .npy "
        "file(s) of rows, Parquet file(s) with float-vector columns, or a token table",
    )
    _sae_flags(p.add_argument_group("the SAE (the sweep YAML's `sae` section)"))
    g = p.add_argument_group("data and layers")
    g.add_argument("--layers", type=int, nargs="+", help="layer(s) to train on (default: all)")
    g.add_argument(
        "--hookpoints",
        nargs="+",
        metavar="PATTERN",
        help="modules to train on instead of --layers, by name pattern below the base model "
        "(sparsify's: 'h.*.mlp', 'layers.*.self_attn'); each module's output, or its input "
        "with a ':input' suffix ('h.*.mlp:input')",
    )
    g.add_argument("--layer_stride", type=int, default=1, help="stride when --layers is unset")
    g.add_argument("--batch_size", type=int, default=4, help="sequences per step (x ctx_len)")
    g.add_argument("--ctx_len", type=int, default=512, help="tokens per sequence")
    g.add_argument(
        "--loss_fn",
        choices=["fvu", "mse", "ce", "kl"],
        default="fvu",
        help="fvu / mse: reconstruction; ce / kl: end to end, the SAE spliced into the model",
    )
    g.add_argument("--text_column", default="text", help="the dataset's text column")
    g.add_argument(
        "--label_column", default="label", help="the dataset's label column (--loss_fn ce)"
    )
    g.add_argument("--shuffle_seed", type=int, default=42, help="seed of the token shuffle")
    g.add_argument(
        "--shuffle_buffer",
        type=int,
        default=SHUFFLE_BUFFER_TOKENS,
        help="rows of each worker's shuffle window: a streamed set's batches are drawn from "
        "shuffled windows of this many (a set that fits in memory, up to 256 MB, is "
        "permuted whole each epoch instead); 0: the stored order",
    )
    g.add_argument(
        "--init_seeds",
        type=int,
        nargs="+",
        default=[42],
        help="seed of the SAE's init (several: one SAE each, co-trained on one stream)",
    )
    g.add_argument("--data_preprocessing_num_proc", type=int, default=1, help="tokeniser threads")
    g = p.add_argument_group("saving and logging")
    g.add_argument("--save_dir", default="./output", help="where runs and the cache go")
    g.add_argument("--run_name", default=None, help="default: <model>-<layers>")
    g.add_argument("--log_to_wandb", type=_bool, nargs="?", const=True, default=False)
    g.add_argument("--wandb_project", default="sae-ray", help="W&B project")
    g.add_argument("--wandb_log_frequency", type=int, default=100, help="steps between logs")
    g.add_argument("--resume", action="store_true", help="continue <save_dir>/<run_name>")
    g.add_argument("--max_steps", type=int, help="stop after this many steps (resumable)")
    g = p.add_argument_group("resources")
    g.add_argument("--num_workers", type=int, default=1, help="Ray Train workers (DDP)")
    g.add_argument("--use_gpu", type=_bool, nargs="?", const=True, default=False)
    g.add_argument("--cpus_per_worker", type=float, default=1.0, help="CPUs per worker")


def head_kind_of(model: str) -> str:
    from sae_ray.sae.spliced import head_kind

    if model == "tiny-gpt2":
        return "lm"
    if model == "tiny-bert":
        return "classifier"
    try:
        return head_kind(model)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_flags(args: argparse.Namespace) -> tuple[Sae, list[dict[str, Any]]]:
    """What needs no model or Ray, checked before either starts; returns the SAE config
    and the co-trained variants."""
    for flag in ("batch_size", "ctx_len", "num_workers", "layer_stride"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag}: must be at least 1")
    if args.activations is None and (args.model is None or args.dataset is None):
        raise ConfigError("MODEL and DATASET are required (or train on --activations PATH)")
    if args.activations is not None and args.model is not None:
        raise ConfigError("--activations: give MODEL DATASET or --activations, not both")
    if args.activations is not None and args.loss_fn in ("ce", "kl"):
        raise ConfigError(f"--loss_fn: {args.loss_fn} needs the model; --activations has none")
    if args.hookpoints and args.layers:
        raise ConfigError("--hookpoints: give --layers or --hookpoints, not both")
    if args.hookpoints and args.activations is not None:
        raise ConfigError("--hookpoints: --activations trains on every column of its files")
    if args.hookpoints and args.loss_fn in ("ce", "kl"):
        raise ConfigError(
            f"--hookpoints: an end-to-end fit (--loss_fn {args.loss_fn}) splices SAEs at "
            "block outputs; name blocks with --layers"
        )
    sae, variants = _sae_from_flags(args)
    if sae.transcode and args.loss_fn in ("ce", "kl"):
        raise ConfigError(
            f"--transcode: an end-to-end fit (--loss_fn {args.loss_fn}) splices autoencoders "
            "at block outputs; train a transcoder on --loss_fn fvu or mse"
        )
    return sae, variants
