"""SAEs on your own activations (`train-sae --activations`, `train_on_activations`): .npy
rows and Parquet vector columns become the store's token table; bad input is one line."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_ray.cli.main import main
from sae_ray.config import ConfigError
from sae_ray.lm.extraction import load_tokens, read_manifest
from sae_ray.sae.cached import table_of


def _rows(n=300, d=6, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_npy_files_become_one_token_table_in_order(tmp_path):
    a, b = _rows(300), _rows(120, seed=1)
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "a.npy", a)
    np.save(tmp_path / "in" / "b.npy", b)
    table = table_of(tmp_path / "in", tmp_path / "cache")
    manifest = read_manifest(table, verify=True)
    assert (manifest.rows, manifest.d, manifest.columns) == (420, 6, ["x"])
    np.testing.assert_array_equal(load_tokens(table), np.concatenate([a, b]))
    assert table_of(tmp_path / "in", tmp_path / "cache") == table  # cached, not rewritten
    assert table_of(table, tmp_path / "elsewhere") == table  # a token table is used as is


def test_parquet_vector_columns_are_hookpoints(tmp_path):
    x, y = _rows(200, 4), _rows(200, 4, seed=2)
    pq.write_table(
        pa.table(
            {
                "layers.1": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4),
                "layers.2": pa.array(list(y)),  # a plain list column works too
                "token": pa.array(np.arange(200)),
            }
        ),
        tmp_path / "acts.parquet",
    )
    table = table_of(tmp_path / "acts.parquet", tmp_path / "cache")
    assert read_manifest(table).columns == ["layers.1", "layers.2"]
    np.testing.assert_allclose(load_tokens(table, "layers.2"), y)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "MODEL and DATASET are required"),
        (["--activations", "{d}/none.npy"], "no such file or directory"),
        (["--activations", "{d}/mixed"], "both .npy and .parquet files"),
        (["--activations", "{d}/mixed/a.npy", "--loss_fn", "kl"], "--loss_fn: kl needs the model"),
        (["--activations", "{d}/mixed/a.npy", "--k", "64"], "--k: 64 is larger than the 48"),
        (["tiny-gpt2", "synthetic:topics", "--activations", "{d}/x"], "not both"),
    ],
)
def test_bad_activations_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "mixed").mkdir()
    np.save(tmp_path / "mixed" / "a.npy", _rows(10, 6))
    pq.write_table(pa.table({"v": pa.array([[1.0]])}), tmp_path / "mixed" / "b.parquet")
    argv = ["train-sae", *(a.format(d=tmp_path) for a in args)]
    argv += ["--expansion_factor", "8", "--save_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_npy_of_the_wrong_shape_is_refused(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros(10, np.float32))
    with pytest.raises(ConfigError, match="1-d; rows of"):
        table_of(tmp_path / "v.npy", tmp_path / "cache")


@pytest.mark.ray
def test_sae_on_your_own_activations_cli_and_python(ray_cluster, tmp_path):
    """Parquet with two vector columns through `train-sae --activations` (one SAE per
    column and k, one run), and a .npy through `train_on_activations`: sparsify's layout."""
    import sparsify

    from sae_ray.sae.cached import train_on_activations

    d = 8
    basis = np.random.default_rng(0).standard_normal((32, d)).astype(np.float32)
    codes = np.random.default_rng(1).random((3000, 32)) * (
        np.random.default_rng(2).random((3000, 32)) < 0.1
    )
    x = (codes @ basis).astype(np.float32)  # sparse in a 32-direction dictionary
    pq.write_table(
        pa.table(
            {
                "a": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), d),
                "b": pa.FixedSizeListArray.from_arrays(pa.array((2 * x).ravel()), d),
            }
        ),
        tmp_path / "acts.parquet",
    )
    args = ["train-sae", "--activations", str(tmp_path / "acts.parquet"), "--k", "4", "2"]
    args += ["--expansion_factor", "4", "--max_tokens", "12000", "--batch_size", "1"]
    args += ["--ctx_len", "256", "--save_dir", str(tmp_path / "out")]
    assert main(args) == 0
    for k in (4, 2):
        loaded = sparsify.SparseCoder.load_many(
            str(tmp_path / "out" / "acts" / f"k{k}"), local=True
        )
        assert sorted(loaded) == ["a", "b"] and loaded["a"].cfg.k == k

    np.save(tmp_path / "x.npy", x)
    sae = {"k": 4, "expansion_factor": 4, "max_tokens": 12000, "batch_size": 256}
    result = train_on_activations(tmp_path / "x.npy", sae, save_dir=tmp_path / "py")
    assert set(result.saes) == {"x"} and result.metrics["tokens"] >= 12000
    assert 0 < result.metrics["fvu/x"] < 0.5  # it learned the dictionary's directions
    assert (tmp_path / "py" / "x" / "x" / "sae.safetensors").is_file()
