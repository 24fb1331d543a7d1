import numpy as np
import pandas as pd
import pytest

from sae_ray.config import ConfigError, Dataset
from sae_ray.lm import hub
from sae_ray.lm.text_data import load_text_data, synthetic_topics


def test_synthetic_is_deterministic_and_balanced():
    a, b = synthetic_topics(400), synthetic_topics(400)
    assert a == b
    assert np.bincount(a[1]).tolist() == [100, 100, 100, 100]


def test_splits_are_disjoint_with_unique_ids(topics):
    ids = np.concatenate([s.ids for s in topics.splits.values()])
    assert len(ids) == len(set(ids.tolist())) == 200
    assert topics.num_classes == 4
    assert all(len(s) > 0 for s in topics.splits.values())


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_local_files(tmp_path, suffix):
    texts, labels = synthetic_topics(100)
    frame = pd.DataFrame({"text": texts, "label": [f"c{y}" for y in labels]})
    path = tmp_path / f"data.{suffix}"
    {
        "csv": lambda: frame.to_csv(path, index=False),
        "jsonl": lambda: frame.to_json(path, orient="records", lines=True),
        "parquet": lambda: frame.to_parquet(path),
    }[suffix]()
    data = load_text_data(Dataset(name=str(path)))
    assert data.label_names == ["c0", "c1", "c2", "c3"]
    assert sum(len(s) for s in data.splits.values()) == 100


def test_local_missing_column_names_it(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a b", "c d"], "y": [0, 1]}).to_csv(path, index=False)
    with pytest.raises(ConfigError, match="dataset.label_column"):
        load_text_data(Dataset(name=str(path)))


def test_hub_names_resolve_to_real_ids():
    from sae_ray.lm.text_data import hub_dataset

    assert hub_dataset("glue/sst2") == ("nyu-mll/glue", "sst2")
    assert hub_dataset("ag_news") == ("fancyzhx/ag_news", None)
    assert hub_dataset("stanfordnlp/imdb") == ("stanfordnlp/imdb", None)
    assert hub_dataset("nyu-mll/glue:cola") == ("nyu-mll/glue", "cola")


def _fake_hub(monkeypatch, splits):
    """datasets.load_dataset answering with in-memory splits, recording what was asked."""
    import datasets

    asked = []

    def load_dataset(path, name=None, **_):
        asked.append((path, name))
        return datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(hub, "unreachable", lambda repo_id, kind: None)  # the hub answers
    return asked


def _rows(n, start=0, label=lambda i: i % 4, text="text"):
    return {text: [f"doc {start + i}" for i in range(n)], "label": [label(i) for i in range(n)]}


def test_ag_news_preset_keeps_its_test_split_and_carves_validation(monkeypatch):
    asked = _fake_hub(monkeypatch, {"train": _rows(200), "test": _rows(40, start=1000)})
    data = load_text_data(Dataset(name="ag_news", val_fraction=0.1), seed=0)
    assert asked == [("fancyzhx/ag_news", None)]
    test = set(data.splits["test"].texts)
    assert test == {f"doc {1000 + i}" for i in range(40)}  # the source's test split, whole
    val, train = set(data.splits["validation"].texts), set(data.splits["train"].texts)
    assert len(val) == 20 and len(train) == 180 and not val & train
    assert (val | train) == {f"doc {i}" for i in range(200)}  # carved from train


def test_sst2_preset_uses_validation_as_test_when_test_labels_are_hidden(monkeypatch):
    splits = {
        "train": _rows(100, text="sentence", label=lambda i: i % 2),
        "validation": _rows(30, start=500, text="sentence", label=lambda i: i % 2),
        "test": _rows(30, start=900, text="sentence", label=lambda i: -1),  # GLUE hides them
    }
    asked = _fake_hub(monkeypatch, splits)
    data = load_text_data(Dataset(name="glue/sst2", val_fraction=0.2), seed=0)
    assert asked == [("nyu-mll/glue", "sst2")]
    assert set(data.splits["test"].texts) == {f"doc {500 + i}" for i in range(30)}
    assert len(data.splits["validation"]) == 20 and data.num_classes == 2


@pytest.mark.parametrize("split_seed", [0, "per_seed"])
def test_a_per_seed_split_follows_the_experiment_seed(tmp_path, split_seed):
    """`dataset.split_seed: per_seed`: each experiment seed holds out other examples, so
    the seeds' spread includes which examples were held out; a number keeps one split."""
    from sae_ray.config import Config
    from sae_ray.storage.artifacts import ArtifactStore
    from sae_ray.trial.stages import Trial

    cfg = Config.model_validate(
        {"experiment": {"name": "x"}, "dataset": {"num_examples": 200, "split_seed": split_seed}}
    )
    data = load_text_data(cfg.dataset, cfg.dataset.split_for(0))
    trial = Trial(cfg, data, ArtifactStore(str(tmp_path)), str(tmp_path), "per_class")
    same = trial.with_seed(0).data.splits["test"].texts == data.splits["test"].texts
    other = trial.with_seed(1).data.splits["test"].texts == data.splits["test"].texts
    assert same and other == (split_seed == 0)
