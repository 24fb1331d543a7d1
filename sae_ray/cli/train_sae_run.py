"""The work of `sae-ray train-sae`: load the model and the dataset, extract every requested
layer's activations in one pass (or, for `--loss_fn ce|kl`, tokenise for the end-to-end
feed), and train one SAE per layer in one Ray Train run."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import ray
from pydantic import ValidationError

from sae_ray.cli.train_sae import check_fits, check_flags, flag_of, head_kind_of
from sae_ray.config import ConfigError, Dataset, Resources, Sae, local_path_or_name, one_line
from sae_ray.config.sae import stored_activation_dtype
from sae_ray.lm.extraction import extract, read_manifest
from sae_ray.lm.hookpoints import columns as columns_of
from sae_ray.lm.hookpoints import matching, source
from sae_ray.lm.hookpoints import widths as hookpoint_widths
from sae_ray.lm.models import (
    Classifier,
    build_classifier,
    build_tiny_lm,
    hookpoint,
    resolve_layer,
)
from sae_ray.lm.text_data import Split, load_text_data
from sae_ray.sae.feeds import fit_data
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.spliced import load_model, save_for_workers, token_table
from sae_ray.sae.trainer import train_saes
from sae_ray.storage.artifacts import ArtifactStore


def run(args: argparse.Namespace, connect: Callable[[], None] = lambda: None) -> dict:
    """Check what can be checked (flags, save_dir, dataset, model, layers, k against the
    width) before `connect` starts or joins Ray; then extract (cached) or tokenise, and
    train. Returns the final metrics."""
    # HF tokenizers parallelise batch encoding over this many threads.
    os.environ["RAYON_NUM_THREADS"] = str(args.data_preprocessing_num_proc)
    sae, variants = check_flags(args)
    if args.activations is not None:
        return _run_on_activations(args, sae, variants, connect)
    # Workers run elsewhere (another cwd, another node): local paths go to them absolute.
    args.model = local_path_or_name(args.model, Path.cwd())
    args.dataset = local_path_or_name(args.dataset, Path.cwd())
    save_dir = _save_dir(args)
    kind = head_kind_of(args.model) if args.loss_fn in ("ce", "kl") else None
    clf, split = _model_and_data(args, kind)
    layers = [] if args.hookpoints else _layers(args, clf.model)
    hookpoints = _hookpoints(args, clf.model) or [hookpoint(clf.model, ly) for ly in layers]
    columns = columns_of(hookpoints, sae.transcode)
    widths = _widths(clf.model, columns)
    _check_fits(sae, variants, hookpoints, widths)
    # the ids themselves, special ones resolved here: the fit's cfg.json records them
    sae = sae.model_copy(
        update={"exclude_tokens": sae.excluded_ids(clf.tokenizer), "exclude_special_tokens": False}
    )
    connect()
    run_name = args.run_name or f"{Path(args.model).name}-" + "-".join(
        map(str, layers or hookpoints)
    )
    store = ArtifactStore(save_dir / ".activations")
    spec = {
        "model": args.model,
        "dataset": args.dataset,
        "text_column": args.text_column,
        "hookpoints": columns,
        "ctx_len": args.ctx_len,
        "max_tokens": args.max_tokens,
        "dtype": _stored_dtype(args, clf),
        "seed": args.shuffle_seed,
        "init": args.init_seeds[0],  # a tiny model's build seed
        "exclude": sae.exclude_tokens,
    }
    if kind is None:
        tokens_dir = store.get_or_compute(
            "activations", spec, lambda out: _extract(args, clf, split, columns, out, sae)
        ).uri("tokens")
        e2e = None
        data = fit_data(tokens_dir, columns, sae.feed)
    else:
        e2e = _end_to_end(args, kind, clf, store, spec, dict(zip(hookpoints, layers, strict=True)))
        table, tokens_per_epoch = token_table(clf.tokenizer, split, args.ctx_len)
        data = ray.data.from_arrow(table).materialize(), None, tokens_per_epoch
    fit_cfg = _fit_config(args, sae, variants, hookpoints, widths, run_name)
    return _train(args, data, fit_cfg, save_dir, e2e)


def _train(
    args: argparse.Namespace, data: tuple, cfg: SaeTrainConfig, save_dir: Path, e2e=None
) -> dict:
    """The one Ray Train run of the SAEs, checkpoints under `<save_dir>/<run_name>`; `data`
    is (a Ray Dataset or None, a feed factory or None, rows per epoch): `feeds.fit_data`."""
    dataset, feed, rows = data
    result = train_saes(
        dataset,
        rows,
        cfg,
        Resources(
            num_workers=args.num_workers,
            use_gpu=args.use_gpu,
            cpus_per_worker=args.cpus_per_worker,
        ),
        storage_path=save_dir / ".ray_train",
        save_dir=save_dir / cfg.run_name,
        resume=args.resume,
        wandb_dir=save_dir,
        e2e=e2e,
        feed=feed,
    )
    _print_result(save_dir / cfg.run_name, list(cfg.members()), result.metrics)
    return result.metrics


def _run_on_activations(
    args: argparse.Namespace, sae: Sae, variants: list[dict], connect: Callable[[], None]
) -> dict:
    """`--activations PATH`: one SAE per vector column of the files, no model."""
    from sae_ray.sae.cached import table_hookpoints, table_of

    save_dir = _save_dir(args)
    tokens = table_of(args.activations, save_dir / ".activations")
    manifest = read_manifest(tokens)
    try:
        hookpoints = table_hookpoints(manifest, sae.transcode, args.activations)
    except ValueError as err:
        raise ConfigError(f"--{err}") from None
    columns = columns_of(hookpoints, sae.transcode)
    widths = {c: manifest.width(c) for c in columns}
    _check_fits(sae, variants, hookpoints, widths)
    connect()
    run_name = args.run_name or Path(args.activations).stem
    data = fit_data(tokens, columns, sae.feed)
    fit_cfg = _fit_config(args, sae, variants, hookpoints, widths, run_name)
    return _train(args, data, fit_cfg, save_dir)


def _save_dir(args: argparse.Namespace) -> Path:
    save_dir = Path(args.save_dir).expanduser().resolve()
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--save_dir: {save_dir} is not writable ({err.strerror})") from None
    return save_dir


def _model_and_data(args: argparse.Namespace, kind: str | None) -> tuple[Classifier, Split]:
    """The model to read (an LM or a classifier, by its head) and the training split."""
    need_labels = kind == "classifier" and args.loss_fn == "ce"
    dataset = Dataset(
        name=args.dataset, text_column=args.text_column, label_column=args.label_column
    )
    data = load_text_data(dataset, args.shuffle_seed, need_labels)
    split = data.splits["train"]
    try:
        if kind == "lm" and args.model == "tiny-gpt2":
            clf = build_tiny_lm(args.model, split.texts, args.init_seeds[0], args.ctx_len)
        elif kind is not None and args.model != "tiny-bert":
            clf = Classifier(load_model(args.model, kind), _tokenizer(args.model))
        else:
            labels = max(2, data.num_classes)
            seed = args.init_seeds[0]
            clf = build_classifier(args.model, labels, split.texts, seed, args.ctx_len)
    except (OSError, ValueError) as err:  # not on the hub / no network / not a model folder
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"model: cannot load {args.model!r} ({reason})") from None
    return clf, split


def _check_fits(sae: Sae, variants: list[dict], hookpoints: list[str], widths: dict) -> None:
    for hp in hookpoints:
        check_fits(sae, variants, widths[source(hp, sae.transcode)])


def _hookpoints(args: argparse.Namespace, model) -> list[str]:
    """`--hookpoints`' modules (every `--layer_stride`-th, as sparsify), or none given."""
    if not args.hookpoints:
        return []
    try:
        return matching(model, args.hookpoints)[:: args.layer_stride]
    except ValueError as err:
        raise ConfigError(f"--hookpoints: {err}") from None


def _widths(model, columns: list[str]) -> dict[str, int]:
    try:
        return hookpoint_widths(model, columns)
    except ValueError as err:
        raise ConfigError(f"--hookpoints: {err}") from None


def _layers(args: argparse.Namespace, model) -> list[int]:
    n_layers = model.config.num_hidden_layers
    layers = args.layers if args.layers else list(range(0, n_layers, args.layer_stride))
    try:
        return sorted({resolve_layer(model, ly) for ly in layers})
    except ValueError as err:
        raise ConfigError(f"--layers: {str(err).split(': ', 1)[-1]}") from None


def _stored_dtype(args: argparse.Namespace, clf) -> str:
    return stored_activation_dtype(args.activation_dtype, str(next(clf.model.parameters()).dtype))


def _extract(
    args: argparse.Namespace, clf, split: Split, columns: list[str], out: Path, sae: Sae
) -> None:
    extract(
        clf,
        split,
        columns,
        out,
        args.ctx_len,
        dtype=_stored_dtype(args, clf),
        max_tokens=args.max_tokens,
        exclude=sae.exclude_tokens,
    )


def _end_to_end(args, kind: str, clf, store, spec: dict, layers: dict[str, int]) -> dict:
    """What each worker needs to run the frozen model with the SAEs spliced in."""
    model_path = args.model
    if args.model.startswith("tiny-"):  # random weights: workers load this very copy
        model_path = store.get_or_compute(
            "model",
            {**spec, "kind": kind},
            lambda out: save_for_workers(clf.model, clf.tokenizer, out),
        ).location
    return {"model": model_path, "kind": kind, "layers": layers, "ctx_len": args.ctx_len}


def _fit_config(
    args: argparse.Namespace,
    sae: Sae,
    variants: list[dict],
    hookpoints: list[str],
    widths: dict[str, int],
    run_name: str,
) -> SaeTrainConfig:
    """The fit's config; its d_in is the first SAE's input width, `widths` the rest."""
    d_in = widths[source(hookpoints[0], sae.transcode)]
    try:
        return SaeTrainConfig(
            **sae.model_dump(),
            hookpoints=hookpoints,
            d_in=d_in,
            widths={c: w for c, w in widths.items() if w != d_in},
            loss_fn=args.loss_fn,
            log_every=args.wandb_log_frequency,
            max_steps=args.max_steps,
            init_seed=args.init_seeds[0],
            shuffle_seed=args.shuffle_seed,
            shuffle_buffer_tokens=args.shuffle_buffer,
            log_to_wandb=args.log_to_wandb,
            wandb_project=args.wandb_project,
            run_name=run_name,
            variants=variants,
        )
    except ValidationError as err:
        raise ConfigError(one_line(err, flag_of)) from None


def _print_result(run_dir: Path, saes: list[str], metrics: dict) -> None:
    print(f"\nSAEs: {run_dir}  ({metrics.get('tokens', 0):,} tokens)")
    for hp in saes:
        fvu, l0, dead = (metrics.get(f"{m}/{hp}", float("nan")) for m in ("fvu", "l0", "dead_pct"))
        print(f"  {hp}: fvu {fvu:.4f}  l0 {l0:.1f}  dead {dead:.1f}%")


def _tokenizer(name: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:  # GPT-2 style tokenizers ship without one
        tok.pad_token = tok.eos_token
    return tok
