"""`sae-ray train-sae MODEL DATASET`: the saetrain tool's command line, on Ray.

The flags keep saetrain's names and meanings so its users' scripts carry over. One pass of
the model writes every requested layer's activations (Parquet, cached under
`<save_dir>/.activations`, keyed by what determines them); then one Ray Train run trains
an SAE per layer on them and checkpoints to `<save_dir>/<run_name>/<hookpoint>/`, the
layout sparsify and its readers load.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sae_ray.config import ConfigError, Resources


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="hub id, local path, or a tiny preset (tiny-gpt2, tiny-bert)")
    p.add_argument("dataset", help="hub id[:subset], local file/dir, or synthetic:topics")
    g = p.add_argument_group("training")
    g.add_argument("--layers", type=int, nargs="+", help="layer(s) to train on (default: all)")
    g.add_argument("--layer_stride", type=int, default=1, help="stride when --layers is unset")
    g.add_argument("--max_tokens", type=int, default=1_000_000, help="global token budget")
    g.add_argument("--batch_size", type=int, default=4, help="sequences per step (x ctx_len)")
    g.add_argument("--k", type=int, default=192, help="active latents per token")
    g.add_argument("--expansion_factor", type=int, default=32, help="latents = d_in x this")
    g.add_argument("--num_latents", type=int, help="latents (overrides --expansion_factor)")
    g.add_argument("--grad_acc_steps", type=int, default=1)
    g.add_argument("--ctx_len", type=int, default=512, help="tokens per sequence")
    g.add_argument(
        "--loss_fn",
        choices=["fvu", "mse", "ce", "kl"],
        default="fvu",
        help="fvu / mse: reconstruction; ce / kl: end to end, the SAE spliced into the model",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default="adam")
    g.add_argument("--lr", type=float, help="default: 2e-4 / sqrt(latents / 2^14)")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--auxk_alpha", type=float, default=1 / 32)
    g = p.add_argument_group("dead latents")
    g.add_argument(
        "--dead_percentage_threshold",
        type=float,
        default=0.0005,
        help="dead: fires on fewer than this fraction of the window's tokens (0.0005 = 0.05%%)",
    )
    g.add_argument("--dead_window_tokens", type=int, default=10_000_000)
    g = p.add_argument_group("saving and logging")
    g.add_argument("--save_dir", default="./output")
    g.add_argument("--save_every", type=int, default=1000, help="optimizer steps")
    g.add_argument("--run_name", default=None, help="default: <model>-<layers>")
    g.add_argument("--log_to_wandb", type=_bool, nargs="?", const=True, default=False)
    g.add_argument("--wandb_project", default="sae-ray")
    g.add_argument("--wandb_log_frequency", type=int, default=100, help="steps between logs")
    g.add_argument("--resume", action="store_true", help="continue <save_dir>/<run_name>")
    g.add_argument("--max_steps", type=int, help="stop after this many steps (resumable)")
    g = p.add_argument_group("reproducibility and data")
    g.add_argument("--shuffle_seed", type=int, default=42)
    g.add_argument("--shuffle_buffer", type=int, default=16384, help="tokens; 0: no shuffle")
    g.add_argument("--init_seeds", type=int, default=42)
    g.add_argument("--data_preprocessing_num_proc", type=int, default=1, help="tokeniser threads")
    g.add_argument("--text_column", default="text")
    g.add_argument("--activation_dtype", choices=["float32", "float16"], default="float32")
    g = p.add_argument_group("resources")
    g.add_argument("--num_workers", type=int, default=1, help="Ray Train workers (DDP)")
    g.add_argument("--use_gpu", type=_bool, nargs="?", const=True, default=False)
    g.add_argument("--cpus_per_worker", type=float, default=1.0)


def _head_kind(model: str) -> str:
    from sae_ray.e2e import head_kind

    if model == "tiny-gpt2":
        return "lm"
    if model == "tiny-bert":
        return "classifier"
    try:
        return head_kind(model)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_flags(args: argparse.Namespace) -> None:
    """What needs no model or Ray: checked before either starts."""
    for flag in ("max_tokens", "batch_size", "ctx_len", "num_workers", "save_every", "k"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag}: must be at least 1")


def run(args: argparse.Namespace) -> dict:
    """Extract (cached) or tokenise, then train; returns the final metrics."""
    import ray

    from sae_ray.activations import extract, read_manifest
    from sae_ray.config import Dataset, local_path_or_name
    from sae_ray.data import load_text_data
    from sae_ray.models import build_classifier, build_tiny_lm, hookpoint, resolve_layer
    from sae_ray.sae_train import SaeTrainConfig, activation_dataset, train_saes
    from sae_ray.store import ArtifactStore

    # HF tokenizers parallelise batch encoding over this many threads.
    os.environ["RAYON_NUM_THREADS"] = str(args.data_preprocessing_num_proc)
    check_flags(args)
    # Workers run elsewhere (another cwd, another node): local paths go to them absolute.
    args.model = local_path_or_name(args.model, Path.cwd())
    args.dataset = local_path_or_name(args.dataset, Path.cwd())
    save_dir = Path(args.save_dir).expanduser().resolve()
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--save_dir: {save_dir} is not writable ({err.strerror})") from None
    end_to_end = args.loss_fn in ("ce", "kl")
    kind = _head_kind(args.model) if end_to_end else None
    need_labels = kind == "classifier" and args.loss_fn == "ce"
    data = load_text_data(
        Dataset(name=args.dataset, text_column=args.text_column), args.shuffle_seed, need_labels
    )
    split = data.splits["train"]
    num_labels = max(2, data.num_classes)
    if kind == "lm" and args.model == "tiny-gpt2":
        clf = build_tiny_lm(args.model, split.texts, args.init_seeds, args.ctx_len)
    elif end_to_end and args.model not in ("tiny-bert",):
        from sae_ray.e2e import load_model
        from sae_ray.models import Classifier

        clf = Classifier(load_model(args.model, kind), _tokenizer(args.model))
    else:
        clf = build_classifier(args.model, num_labels, split.texts, args.init_seeds, args.ctx_len)
    n_layers = clf.model.config.num_hidden_layers
    layers = args.layers if args.layers else list(range(0, n_layers, args.layer_stride))
    try:
        layers = sorted({resolve_layer(clf.model, ly) for ly in layers})
    except ValueError as err:
        raise ConfigError(f"--layers: {str(err).split(': ', 1)[-1]}") from None
    hookpoints = [hookpoint(clf.model, ly) for ly in layers]
    run_name = args.run_name or f"{Path(args.model).name}-" + "-".join(map(str, layers))

    store = ArtifactStore(save_dir / ".activations")
    spec = {
        "model": args.model,
        "dataset": args.dataset,
        "text_column": args.text_column,
        "layers": layers,
        "ctx_len": args.ctx_len,
        "max_tokens": args.max_tokens,
        "dtype": args.activation_dtype,
        "seed": args.shuffle_seed,
        "init": args.init_seeds,
    }
    e2e = None
    if end_to_end:
        from sae_ray.e2e import save_for_workers, token_table

        model_path = args.model
        if args.model.startswith("tiny-"):  # random weights: workers load this very copy
            model_path = store.get_or_compute(
                "model",
                {**spec, "kind": kind},
                lambda out: save_for_workers(clf.model, clf.tokenizer, out),
            ).location
        table, tokens_per_epoch = token_table(clf.tokenizer, split, args.ctx_len)
        dataset = ray.data.from_arrow(table).materialize()
        e2e = {
            "model": model_path,
            "kind": kind,
            "layers": dict(zip(hookpoints, layers, strict=True)),
            "ctx_len": args.ctx_len,
        }
        d_in = clf.model.config.hidden_size
    else:

        def make(out: Path) -> None:
            extract(
                clf,
                split,
                layers,
                out,
                args.ctx_len,
                dtype=args.activation_dtype,
                max_tokens=args.max_tokens,
            )

        tokens_dir = store.get_or_compute("activations", spec, make).uri("tokens")
        d_in = read_manifest(tokens_dir).d
        dataset, tokens_per_epoch = activation_dataset(tokens_dir, hookpoints)
    try:
        cfg = SaeTrainConfig(
            hookpoints=hookpoints,
            d_in=d_in,
            k=args.k,
            expansion_factor=args.expansion_factor,
            num_latents=args.num_latents,
            batch_tokens=args.batch_size * args.ctx_len,
            grad_acc_steps=args.grad_acc_steps,
            max_tokens=args.max_tokens,
            optimizer=args.optimizer,
            lr=args.lr,
            weight_decay=args.weight_decay,
            auxk_alpha=args.auxk_alpha,
            loss_fn=args.loss_fn,
            dead_window_tokens=args.dead_window_tokens,
            dead_percentage_threshold=args.dead_percentage_threshold,
            save_every=args.save_every,
            log_every=args.wandb_log_frequency,
            max_steps=args.max_steps,
            init_seed=args.init_seeds,
            shuffle_seed=args.shuffle_seed,
            shuffle_buffer_tokens=args.shuffle_buffer,
            log_to_wandb=args.log_to_wandb,
            wandb_project=args.wandb_project,
            run_name=run_name,
        )
    except ValueError as err:  # pydantic's ValidationError is one
        first = err.errors()[0] if hasattr(err, "errors") else {"loc": (), "msg": str(err)}
        field = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        # a model-level check's message already starts with the field's name
        raise ConfigError(f"--{field}: {msg}" if field else f"--{msg}") from None
    resources = Resources(
        num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker
    )
    result = train_saes(
        dataset,
        tokens_per_epoch,
        cfg,
        resources,
        storage_path=save_dir / ".ray_train",
        save_dir=save_dir / run_name,
        resume=args.resume,
        wandb_dir=save_dir,
        e2e=e2e,
    )
    print(f"\nSAEs: {save_dir / run_name}  ({result.metrics.get('tokens', 0):,} tokens)")
    for hp in hookpoints:
        fvu, l0, dead = (
            result.metrics.get(f"{m}/{hp}", float("nan")) for m in ("fvu", "l0", "dead_pct")
        )
        print(f"  {hp}: fvu {fvu:.4f}  l0 {l0:.1f}  dead {dead:.1f}%")
    return result.metrics


def _tokenizer(name: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:  # GPT-2 style tokenizers ship without one
        tok.pad_token = tok.eos_token
    return tok
