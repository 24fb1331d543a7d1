"""Labelled text datasets -> train / validation / held-out test splits with stable example ids.

Example ids are what sharpened targets are joined on, so they are assigned once here and
travel with every row (tokens, activations, targets) from then on.
"""

from __future__ import annotations

import codecs
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae_ray.config import ConfigError, Dataset
from sae_ray.lm import hub

SPLITS = ("train", "validation", "test")

# Four topics that a bag of words separates: small enough to learn in seconds on a CPU.
_TOPICS = {
    "sports": "goal match team score coach league player season win stadium referee ball "
    "tournament striker defender keeper race medal sprint champion",
    "science": "atom cell theory experiment lab molecule energy physics quantum gene "
    "protein data telescope orbit neuron chemistry research particle hypothesis fossil",
    "food": "bread cheese recipe oven spice soup garlic butter pasta sauce kitchen chef "
    "flavor tomato salad bake roast dessert noodle pepper",
    "music": "guitar song album band melody chord drum concert rhythm piano lyric singer "
    "tempo orchestra jazz chorus violin stage vinyl tune",
}
_FILLER = (
    "the a of and to in is it that was for on with as at by this from they we say her she "
    "or an will my one all would there their what so up out if about who get which go me "
    "when make can like time no just him know take people into year your good"
).split()


@dataclass
class Split:
    """A split's rows: texts (tokenised per batch), or for a language model fixed-length
    token blocks packed from its documents (`tokens`, with `mask` 0 on the padding of the
    last block). Either way, a row is what a batch row, its id and its label are."""

    ids: np.ndarray  # int64, unique across all splits
    texts: list[str]
    labels: np.ndarray  # int64 in [0, num_classes)
    tokens: np.ndarray | None = None  # (rows, block) int64
    mask: np.ndarray | None = None  # (rows, block) int64

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class TextData:
    splits: dict[str, Split]
    num_classes: int
    label_names: list[str]


def synthetic_topics(num_examples: int, seed: int = 1234) -> tuple[list[str], list[int]]:
    """A deterministic 4-class task: ~35% of each text's words come from its topic."""
    rng = np.random.default_rng(seed)
    topics = [words.split() for words in _TOPICS.values()]
    texts, labels = [], []
    for i in range(num_examples):
        label = i % len(topics)
        length = int(rng.integers(8, 21))
        from_topic = rng.random(length) < 0.35
        words = [
            topics[label][rng.integers(len(topics[label]))]
            if t
            else _FILLER[rng.integers(len(_FILLER))]
            for t in from_topic
        ]
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def synthetic_text(num_docs: int, seed: int = 1234) -> list[str]:
    """Plain text a tiny LM can learn in seconds: each document walks one topic's Markov
    chain, where every word has 4 possible successors (a perplexity floor near 4)."""
    rng = np.random.default_rng(seed)
    vocab = sorted({w for words in _TOPICS.values() for w in words.split()} | set(_FILLER))
    chains = [
        {w: rng.choice(len(vocab), 4, replace=False) for w in vocab} for _ in range(len(_TOPICS))
    ]
    docs = []
    for i in range(num_docs):
        chain, word = chains[i % len(chains)], vocab[rng.integers(len(vocab))]
        words = [word]
        for _ in range(int(rng.integers(20, 61)) - 1):
            word = vocab[chain[word][rng.integers(4)]]
            words.append(word)
        docs.append(" ".join(words))
    return docs


def wikitext_documents(lines: list[str]) -> list[str]:
    """WikiText's rows are lines; its articles start at ` = Title = ` headings. Documents,
    not lines, are what the splits draw (no article in two splits)."""
    docs: list[list[str]] = []
    for line in lines:
        text = line.strip()
        if not text:
            continue
        top = text.startswith("= ") and text.endswith(" =") and not text.startswith("= =")
        if top or not docs:
            docs.append([])
        docs[-1].append(text)
    return ["\n".join(doc) for doc in docs]


def _read_local(path: Path):
    import datasets

    datasets.disable_progress_bars()  # one bar per split per trial drowns the sweep's output

    # .txt: plain text, one document per blank-line-separated paragraph (causal_lm)
    kinds = {
        ".parquet": "parquet",
        ".csv": "csv",
        ".jsonl": "json",
        ".json": "json",
        ".txt": "text",
    }
    if path.is_dir():
        files = {}
        for split, alias in (("train", "train"), ("validation", "validation"), ("test", "test")):
            found = [p for p in path.iterdir() if p.stem in (split, alias) and p.suffix in kinds]
            if found:
                files[split] = str(found[0])
        if "train" not in files:
            raise ConfigError(f"dataset.name: {path} has no train.(parquet|csv|jsonl|txt) file")
        kind = kinds[Path(files["train"]).suffix]
    elif path.suffix in kinds:
        files, kind = {"train": str(path)}, kinds[path.suffix]
    else:
        raise ConfigError(f"dataset.name: {path} is not a .parquet, .csv, .jsonl or .txt file")
    for file in files.values():
        _check_file(Path(file), kind)
    extra = {"sample_by": "paragraph"} if kind == "text" else {}
    where = path if path.is_dir() else Path(files["train"])
    quiet = logging.getLogger("datasets")  # it logs each failed read before raising
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(kind, data_files=files, **extra)
    except Exception as err:  # a damaged file: one line naming it and what is wrong
        raise ConfigError(f"dataset.name: {where}: {_read_error(err, kind)}") from None
    finally:
        quiet.setLevel(level)


def _check_file(path: Path, kind: str) -> None:
    """What a data file must be before a reader sees it: not empty, and text files UTF-8
    (the readers' own errors for these are tracebacks that name neither file nor line)."""
    if path.stat().st_size == 0:
        raise ConfigError(f"dataset.name: {path} is empty")
    if kind == "parquet":
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                line += chunk[: err.start].count(b"\n")
                raise ConfigError(
                    f"dataset.name: {path}: not UTF-8 text (byte 0x{chunk[err.start]:02x} "
                    f"at offset {offset + err.start}, line {line}); save it as UTF-8"
                ) from None
            line += chunk.count(b"\n")
            offset += len(chunk)


def _read_error(err: BaseException, kind: str) -> str:
    """The reader's own reason (under `datasets`' wrappers), in words a user can act on."""
    while type(err).__module__.startswith("datasets") and (err.__cause__ or err.__context__):
        err = err.__cause__ or err.__context__
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "corresponds to no data" in reason:
        return "has no data rows (a header alone?)"
    if "magic bytes" in reason:
        return "is not a Parquet file (its footer has no Parquet magic bytes)"
    name = {"csv": "CSV", "json": "JSON lines", "text": "text", "parquet": "Parquet"}[kind]
    return f"cannot be read as {name} ({reason})"


# Short names for the seed experiments' datasets -> (hub id, subset).
HUB_PRESETS = {
    "glue/sst2": ("nyu-mll/glue", "sst2"),
    "sst2": ("nyu-mll/glue", "sst2"),
    "ag_news": ("fancyzhx/ag_news", None),
    # plain text for causal_lm (the seed's CPT corpora; the Pile as its public 10k subset)
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "pile": ("NeelNanda/pile-10k", None),
}


def hub_dataset(name: str) -> tuple[str, str | None]:
    """A preset, or 'owner/id' with an optional ':subset' (e.g. 'nyu-mll/glue:sst2')."""
    if name in HUB_PRESETS:
        return HUB_PRESETS[name]
    hub_id, _, subset = name.partition(":")
    return hub_id, subset or None


def _load_raw(cfg: Dataset, need_labels: bool = True) -> dict[str, tuple[list[str], list]]:
    """Each available split as (texts, labels), from the synthetic task, local files or the hub."""
    if cfg.name == "synthetic:text":
        return {"train": (synthetic_text(cfg.num_examples), [0] * cfg.num_examples)}
    if cfg.name.startswith("synthetic:"):
        if cfg.name != "synthetic:topics":
            raise ConfigError(f"dataset.name: unknown synthetic task {cfg.name!r}")
        return {"train": synthetic_topics(cfg.num_examples)}
    path = Path(cfg.name).expanduser()
    if path.exists():
        dd = _read_local(path)
    elif cfg.name.startswith((".", "/", "~")) or path.suffix in (
        ".csv",
        ".jsonl",
        ".parquet",
        ".txt",
    ):
        raise ConfigError(f"dataset.name: {cfg.name}: no such file or directory")
    else:
        import datasets

        hub_id, subset = hub_dataset(cfg.name)
        hub.check("dataset.name", cfg.name, hub_id, "dataset")
        datasets.disable_progress_bars()
        try:
            dd = datasets.load_dataset(hub_id, subset)
        except Exception as err:  # network, missing repo or subset: say which, in one line
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"dataset.name: cannot load {cfg.name!r} ({reason})") from err
    out = {}
    for split in dd:
        columns = dd[split].column_names
        text_col = cfg.text_column if cfg.text_column in columns else _guess_text(columns)
        if text_col is not None and cfg.label_column not in columns and not need_labels:
            out[split] = (list(dd[split][text_col]), [0] * len(dd[split]))
            continue
        if text_col is None or cfg.label_column not in columns:
            missing = cfg.label_column if text_col else cfg.text_column
            raise ConfigError(
                f"dataset.{'label' if text_col else 'text'}_column: "
                f"{missing!r} not in {cfg.name} ({', '.join(columns)})"
            )
        out[split] = (list(dd[split][text_col]), list(dd[split][cfg.label_column]))
    return out


def _guess_text(columns: list[str]) -> str | None:
    # glue/sst2 calls its text column "sentence".
    return next((c for c in ("text", "sentence", "content") if c in columns), None)


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


MAX_LABEL_GAP = 10  # class ids may skip a few numbers, not run to 999999 for two classes


def _checked(raw: dict[str, tuple[list, list]], cfg: Dataset, need_labels: bool) -> dict:
    """Refuse, in one line naming the column, data that would load but train nonsense:
    empty texts, missing or fractional labels, sparse label ids, a split with one class, or
    too few rows for the splits asked for. Integral float labels (1.0) become ints."""
    for split, (texts, labels) in raw.items():
        empty = [i for i, t in enumerate(texts) if t is None or not str(t).strip()]
        if empty:
            raise ConfigError(
                f"dataset.text_column: {len(empty)} empty text(s) in {cfg.name} {split} "
                f"(first at row {empty[0]}); drop or fill them"
            )
        missing = [i for i, y in enumerate(labels) if y is None or _is_nan(y)]
        if missing and need_labels:
            raise ConfigError(
                f"dataset.label_column: {len(missing)} row(s) without a label in {cfg.name} "
                f"{split} (first at row {missing[0]})"
            )
        fractional = next((y for y in labels if isinstance(y, float) and y != int(y)), None)
        if fractional is not None:
            raise ConfigError(
                f"dataset.label_column: label {fractional} is not a class (use integer ids "
                "or names)"
            )
        raw[split] = (texts, [int(y) if isinstance(y, float) else y for y in labels])
    ints = {y for _, ys in raw.values() for y in ys if isinstance(y, (int, np.integer))}
    if ints and max(ints) + 1 > len(ints) + MAX_LABEL_GAP:
        raise ConfigError(
            f"dataset.label_column: label ids run to {max(ints)} for {len(ints)} classes "
            "(ids must be 0..C-1)"
        )
    for split, (_, labels) in raw.items():
        if need_labels and len(set(labels)) < 2:
            raise ConfigError(
                f"dataset.label_column: the {split} split of {cfg.name} has fewer than two classes"
            )
    return raw


def _documents(raw: dict, cfg: Dataset) -> dict:
    """Plain text for a language model: empty rows dropped, WikiText's lines as articles."""
    out = {}
    for split, (texts, _) in raw.items():
        texts = [str(t) for t in texts if t is not None and str(t).strip()]
        if cfg.name.startswith("wikitext") or "wikitext" in cfg.name.lower():
            texts = wikitext_documents(texts)
        out[split] = (texts, [0] * len(texts))
    return out


def load_text_data(
    cfg: Dataset, seed: int | None = None, need_labels: bool = True, documents: bool = False
) -> TextData:
    """Train / validation / test. A labelled test split from the source is the held-out test;
    otherwise the source's validation split is, and validation is carved from train, drawn
    by `seed` (default: `dataset.split_seed`; a trial passes its experiment seed's,
    `Dataset.split_for`).

    `need_labels=False` (SAE training) accepts unlabelled text: every label is then 0.
    `documents` (causal_lm) reads plain text: the splits draw whole documents, which the
    language model's batches then pack into token blocks."""
    raw = _load_raw(cfg, need_labels and not documents)
    if documents:
        raw, need_labels = _documents(raw, cfg), False
    raw = {s: (t, y) for s, (t, y) in raw.items() if not all(v == -1 for v in y)}  # unlabelled
    raw = _checked(raw, cfg, need_labels)
    label_values = sorted({v for _, ys in raw.values() for v in ys}, key=str)
    if all(isinstance(v, (int, np.integer)) for v in label_values):
        if label_values[0] < 0:
            raise ConfigError(f"dataset.label_column: label {label_values[0]} is negative")
        names = [str(v) for v in range(int(max(label_values)) + 1)]
        to_int = {v: int(v) for v in label_values}
    else:
        names = [str(v) for v in label_values]
        to_int = {v: i for i, v in enumerate(label_values)}
    if len(label_values) < 2 and need_labels:  # one label seen, whatever its number
        raise ConfigError(f"dataset.label_column: {cfg.name} has fewer than two classes")

    rng = np.random.default_rng(cfg.split_for(0) if seed is None else seed)
    train_t, train_y = raw["train"]
    order = rng.permutation(len(train_t))
    test = raw.get("test") or raw.get("validation")
    n_val = max(2, int(round(cfg.val_fraction * len(train_t))))
    n_test = 0 if test else max(2, int(round(cfg.test_fraction * len(train_t))))
    if len(train_t) < n_val + n_test + 2:
        raise ConfigError(
            f"dataset.name: {cfg.name} has {len(train_t)} training rows, too few to carve "
            f"{n_val} validation and {n_test} test rows and keep some to train on"
        )
    val_idx, test_idx, tr_idx = np.split(order, [n_val, n_val + n_test])
    if cfg.max_examples:
        tr_idx = tr_idx[: cfg.max_examples]
    pick = {"train": tr_idx, "validation": val_idx}
    parts = {s: ([train_t[i] for i in idx], [train_y[i] for i in idx]) for s, idx in pick.items()}
    parts["test"] = (
        test if test else ([train_t[i] for i in test_idx], [train_y[i] for i in test_idx])
    )

    splits, next_id = {}, 0
    for name in SPLITS:
        texts, ys = parts[name]
        ids = np.arange(next_id, next_id + len(texts), dtype=np.int64)
        next_id += len(texts)
        labels = np.array([to_int[v] for v in ys], dtype=np.int64)
        splits[name] = Split(ids=ids, texts=[str(t) for t in texts], labels=labels)
    return TextData(splits=splits, num_classes=len(names), label_names=names)
