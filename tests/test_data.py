import numpy as np
import pandas as pd
import pytest

from sae_ray.config import ConfigError, Dataset
from sae_ray.data import load_text_data, synthetic_topics


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
    from sae_ray.data import hub_dataset

    assert hub_dataset("glue/sst2") == ("nyu-mll/glue", "sst2")
    assert hub_dataset("ag_news") == ("fancyzhx/ag_news", None)
    assert hub_dataset("stanfordnlp/imdb") == ("stanfordnlp/imdb", None)
    assert hub_dataset("nyu-mll/glue:cola") == ("nyu-mll/glue", "cola")
