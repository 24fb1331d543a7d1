"""Extraction: hooked forward + Parquet shards (tokens and sequences, with their checksums)
vs the bare forward over the same batches. Target >= 0.9 (tokens/s, ours / bare).

Both sides tokenise the same batches and run the same frozen model under `no_grad`; ours is
`activations.extract` itself, writing to a temporary directory. Alternated A B A B; the
median pass of each side.

    python -m benchmarks.extraction                       # MiniLM (real weights), layer 3
    python -m benchmarks.extraction --model tiny-gpt2     # quicker, and a worst case:
                                                          # the forward is nearly free
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import device_name, emit, interleaved
from sae_ray.config import Dataset
from sae_ray.lm.batching import batches
from sae_ray.lm.extraction import extract
from sae_ray.lm.models import build_classifier
from sae_ray.lm.text_data import load_text_data


def setup(model: str, examples: int, max_length: int):
    data = load_text_data(Dataset(name="synthetic:topics", num_examples=examples), seed=0)
    split = data.splits["train"]
    clf = build_classifier(model, data.num_classes, split.texts, 0, max_length)
    clf.model.eval()
    return clf, split


def bare_forward(clf, split, batch_size: int, max_length: int) -> int:
    """The forward alone over extraction's batches; returns the non-pad tokens seen."""
    tokens = 0
    with torch.no_grad():
        for batch in batches(clf, split, batch_size, max_length):
            clf.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            tokens += int(batch["attention_mask"].sum())
    return tokens


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="minilm, tiny-gpt2, or a local path")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--examples", type=int, default=3000, help="synthetic:topics size")
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    clf, split = setup(args.model, args.examples, args.max_length)
    tokens = bare_forward(clf, split, args.batch, args.max_length)

    def ours() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            extract(clf, split, args.layer, Path(tmp), args.max_length, batch_size=args.batch)

    secs = interleaved(
        {"extract": ours, "bare": lambda: bare_forward(clf, split, args.batch, args.max_length)},
        args.repeats,
        warmup=0,  # the token count above was the warm-up
    )
    return emit(
        "extraction_tokens_per_s",
        tokens / secs["extract"],
        tokens / secs["bare"],
        target=0.9,
        better="higher",
        unit="tokens/s",
        sides=("hooked forward + Parquet shards", "bare forward"),
        config={
            "model": args.model,
            "layer": args.layer,
            "d": clf.model.config.hidden_size,
            "train_examples": len(split),
            "tokens": tokens,
            "max_length": args.max_length,
            "batch": args.batch,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
        },
        device=device_name("cpu"),
    )


if __name__ == "__main__":
    main()
