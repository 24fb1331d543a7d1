"""End-to-end on a real local Ray cluster (one per session): Ray Data -> Ray Train -> Tune."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from sae_ray.config import Resources
from sae_ray.lm.extraction import ShardWriter, vectors_to_arrow

pytestmark = pytest.mark.ray


def _write_tokens(root: Path, x: np.ndarray, shard_rows: int) -> None:
    writer = ShardWriter(root, "tokens", x.shape[1], "float32", rows_per_shard=shard_rows)
    for start in range(0, len(x), 100):
        chunk = x[start : start + 100]
        writer.write(
            pa.record_batch(
                {
                    "example_id": pa.array(np.arange(start, start + len(chunk), dtype=np.int64)),
                    "x": vectors_to_arrow(chunk),
                }
            )
        )
    writer.close()


def _record_ids(config):
    import ray.train

    ctx = ray.train.get_context()
    seen = []
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=64):
        seen.extend(batch["example_id"].tolist())
    out = Path(config["out"]) / f"rank{ctx.get_world_rank()}.json"
    out.write_text(json.dumps(seen))
    ray.train.report({"rows": len(seen)})


def test_ray_data_delivers_every_row_once_across_two_workers(ray_cluster, tmp_path):
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sae_ray.lm.extraction import read_manifest

    rows = 2000
    _write_tokens(
        tmp_path / "tokens",
        np.random.default_rng(0).standard_normal((rows, 8)).astype(np.float32),
        shard_rows=700,
    )
    manifest = read_manifest(tmp_path / "tokens", verify=True)
    assert len(manifest.files) == 3
    # the ids alone: a vector column is binary rows, for `arrow_to_vectors`, not torch
    ds = ray.data.read_parquet(manifest.paths(tmp_path / "tokens"), columns=["example_id"])
    trainer = TorchTrainer(
        _record_ids,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="exactly-once", storage_path=str(tmp_path / "train")),
        datasets={"train": ds},
    )
    trainer.fit()
    per_worker = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(len(ids) > 0 for ids in per_worker), "both workers must get data"
    everything = sorted(per_worker[0] + per_worker[1])
    assert everything == list(range(rows))  # every row, exactly once


def test_sae_through_ray_train_learns_a_sparse_dictionary(ray_cluster, tmp_path, monkeypatch):
    """Fed by the workers' stream (what activation sets above the hold threshold take: each
    worker reads its share again each epoch), split over two workers."""
    from sae_ray.lm.extraction import read_manifest
    from sae_ray.method.evaluate import sae_quality
    from sae_ray.sae import feeds
    from sae_ray.sae.fit_config import SaeTrainConfig
    from sae_ray.sae.trainer import train_saes

    rng = np.random.default_rng(0)
    d, atoms, k, n = 32, 64, 4, 12000
    dictionary = rng.standard_normal((atoms, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    codes = np.zeros((n, atoms))
    for row in range(n):
        codes[row, rng.choice(atoms, k, replace=False)] = rng.uniform(0.5, 2.0, k)
    x = (codes @ dictionary).astype(np.float32)
    _write_tokens(tmp_path / "tokens", x[:10000], shard_rows=4000)
    cfg = SaeTrainConfig(
        hookpoints=["x"],
        d_in=d,
        k=k,
        expansion_factor=4,
        epochs=8,
        batch_size=256,
        lr=5e-3,
        dead_tokens=5000,
        progress=False,
        run_name="sae-known-dictionary",
    )
    monkeypatch.setattr(feeds, "MATERIALIZE_BYTES", 0)  # 1.3 MB: streamed, not held
    manifest = read_manifest(tmp_path / "tokens")
    feed = feeds.worker_feed(str(tmp_path / "tokens"), manifest, ["x"])
    assert feed.__qualname__.startswith("streamed_feed")
    result = train_saes(
        None, manifest.rows, cfg, Resources(num_workers=2), tmp_path / "train", feed=feed
    )
    sae = result.saes["x"]
    held_out = sae_quality(sae, x[10000:])
    assert held_out["fvu"] < 0.2, held_out
    assert result.metrics["tokens"] == 8 * 10000  # global count over both workers
    decoder = sae.W_dec.detach()
    assert decoder.norm(dim=1).allclose(torch.ones(len(decoder)), atol=1e-4)
    best_cos = (decoder @ torch.from_numpy(dictionary).float().T).max(0).values
    assert (best_cos > 0.9).float().mean() >= 0.9  # the true atoms are found


TRAIN_SAE = [
    "train-sae",
    "tiny-gpt2",
    "synthetic:topics",
    "--layers",
    "0",
    "1",
    "--max_tokens",
    "8000",
    "--batch_size",
    "8",
    "--ctx_len",
    "32",
    "--architecture",
    "topk",
    "batchtopk",
    "--k",
    "8",
    "4",
    "--expansion_factor",
    "4",
    "--save_every",
    "5",
    "--wandb_log_frequency",
    "1",
    "--log_to_wandb",
    "true",
]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_sae_cli_resume_equals_an_uninterrupted_run(ray_cluster, tmp_path):
    """`train-sae` on two layers from one extraction, two architectures x two k
    (`--architecture topk batchtopk --k 8 4`): eight SAEs co-trained on one stream, a folder
    each; stop after 13 steps, `--resume`, and the result is the uninterrupted run's: same
    tokens, same parameters (BatchTopK's threshold too), no step twice."""
    import sparsify
    from safetensors.torch import load_file

    from sae_ray.cli import main as cli
    from sae_ray.sae.model import SparseAutoencoder

    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli.main([*TRAIN_SAE, "--save_dir", str(whole)]) == 0
    assert cli.main([*TRAIN_SAE, "--save_dir", str(split), "--max_steps", "13"]) == 0
    assert json.loads((split / "tiny-gpt2-0-1" / "state.json").read_text())["step"] == 13
    assert cli.main([*TRAIN_SAE, "--save_dir", str(split), "--resume"]) == 0

    a, b = whole / "tiny-gpt2-0-1", split / "tiny-gpt2-0-1"
    steps = [row["step"] for row in _log(b)]
    assert steps == list(range(1, len(steps) + 1)) == [row["step"] for row in _log(a)]
    assert _log(a)[-1]["tokens"] == _log(b)[-1]["tokens"] == 8000  # the global budget
    variants = [f"{arch}-k{k}" for arch in ("topk", "batchtopk") for k in (8, 4)]
    assert sorted(p.name for p in a.iterdir() if p.is_dir()) == sorted(variants)
    for sae in (f"{v}/{hp}" for v in variants for hp in ("h.0", "h.1")):
        ours, theirs = (load_file(r / sae / "sae.safetensors") for r in (a, b))
        for name, value in ours.items():
            torch.testing.assert_close(theirs[name], value, msg=f"{sae} {name}")
    assert float(SparseAutoencoder.load(a / "batchtopk-k4" / "h.0").threshold) > 0
    row = _log(a)[-1]
    for metric in ("loss", "fvu", "l0", "dead_pct", "mean_max_decoder_cos"):
        assert f"{metric}/batchtopk-k4/h.1" in row, metric
    assert row["l0/topk-k8/h.0"] <= 8 and row["l0/topk-k4/h.0"] <= 4 and row["tokens_per_s"] > 0
    assert 0 < row["fvu/topk-k8/h.0"] < row["fvu/topk-k4/h.0"] < 1  # more latents, less error
    for k in (8, 4):  # each TopK setting's folder is a run sparsify reads
        loaded = sparsify.SparseCoder.load_many(str(a / f"topk-k{k}"), local=True)
        assert sorted(loaded) == ["h.0", "h.1"] and loaded["h.0"].cfg.k == k
    assert list(whole.glob("wandb/offline-run-*"))  # --log_to_wandb, offline here


def test_train_sae_cli_end_to_end_kl(ray_cluster, tmp_path):
    """--loss_fn kl: token rows through Ray Data, the SAE spliced into the LM on the worker."""
    import sparsify

    from sae_ray.cli import main as cli

    args = [*TRAIN_SAE[:3], "--layers", "1", "--loss_fn", "kl", "--max_tokens", "6000"]
    args += ["--batch_size", "16", "--ctx_len", "32", "--k", "8", "--expansion_factor", "4"]
    assert cli.main([*args, "--wandb_log_frequency", "2", "--save_dir", str(tmp_path)]) == 0
    rows = _log(tmp_path / "tiny-gpt2-1")
    assert rows[-1]["tokens"] >= 6000
    assert rows[-1]["loss/h.1"] < rows[0]["loss/h.1"]  # KL(clean || spliced) goes down
    assert sparsify.SparseCoder.load_from_disk(tmp_path / "tiny-gpt2-1" / "h.1").cfg.k == 8


def test_train_sae_cli_refuses_k_above_latents(ray_cluster, tmp_path, capsys):
    from sae_ray.cli import main as cli

    args = [*TRAIN_SAE[:3], "--num_latents", "4", "--k", "8", "--save_dir", str(tmp_path)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --k:"), err


def test_quickstart_sweep_end_to_end(quickstart_sweep):
    results = pd.read_csv(quickstart_sweep / "results.csv")
    assert len(results) == 4 * 2
    assert (results["status"] == "COMPLETE").all()
    assert sorted(results.groupby("trial_id")["cycle"].apply(list).tolist()) == [[0, 1]] * 4
    for column in [
        "trial_id",
        "cycle",
        "sae.k",
        "sae.expansion_factor",
        "sharpening.strategy",
        "val/accuracy",
        "test/accuracy",
        "sae/fvu",
        "sae/l0",
        "sae/dead_pct",
        "interp/u",
    ]:
        assert column in results.columns and results[column].notna().all(), column
    assert set(results["sharpening.strategy"]) == {"per_class", "per_example", "random", "none"}
    assert results.loc[results["sharpening.strategy"] == "none", "is_control"].all()
    assert (results["val/accuracy"] > 0.5).all()  # the task is learnt (chance is 0.25)
    assert (results["sae/fvu"] < 1).all()
    # each strategy against the control within each searched SAE setting: one pair each
    by = pd.read_csv(quickstart_sweep / "comparison_by_setting.csv")
    assert list(by.columns[:3]) == ["sae.k", "sae.expansion_factor", "strategy"]
    assert set(by["strategy"]) == {"per_class", "per_example", "random"} and (by["n"] == 1).all()


def test_quickstart_targets_sharpen_the_reconstruction(quickstart_sweep):
    """With the default keep (half of k), per_class and per_example targets differ from the
    SAE's own reconstruction, and retraining starts with a real aux loss; random targets are
    unrelated to it. Measured on the quickstart task's trained SAEs."""
    rows = pd.read_csv(quickstart_sweep / "results.csv")
    first = rows[rows["cycle"] == 0].set_index("sharpening.strategy")
    for strategy in ("per_class", "per_example"):
        row = first.loc[strategy]
        assert row["targets/recon_cos"] < 0.99, row["targets/recon_cos"]
        assert 0 < row["targets/kept_latents"] <= row["sae.k"] / 2
        assert row["targets/initial_aux"] > 0.01
    assert abs(first.loc["random", "targets/recon_cos"]) < 0.5
    assert np.isnan(first.loc["none", "targets/recon_cos"])  # the control builds none
    assert rows.loc[rows["cycle"] == 1, "targets/recon_cos"].isna().all()  # no next cycle


def test_results_columns_are_the_metrics_objectives_may_name(quickstart_sweep):
    """config/metrics.py lists what an objective or a constraint may name: exactly the
    metric columns a real sweep writes (a new metric must be added there)."""
    from sae_ray.config.metrics import known_metrics

    columns = list(pd.read_csv(quickstart_sweep / "results.csv").columns)
    searched = ["sae.k", "sae.expansion_factor", "sharpening.strategy"]
    rest = ["trial_id", "cycle", *searched, "strategy_effective", "is_control", "n_seeds", "nodes"]
    rest += ["status", "error", "features/log10_density_hist"]  # a JSON string, no metric
    assert sorted(c for c in columns if c not in rest) == sorted(known_metrics(lm=False))


def test_a_point_the_sweep_ran_replays_without_a_train_run(quickstart_sweep, monkeypatch):
    """TPE re-suggests points: a trial at a point that ran to its end reports the same
    numbers from its record, computing nothing and starting no Ray Train run."""
    from sae_ray import config as C
    from sae_ray.trial import driver as trial_run

    def no_train_run(*args, **kwargs):
        raise AssertionError("a replay started a Train run")

    monkeypatch.setattr(trial_run, "torch_trainer", no_train_run)
    cfg = C.load(quickstart_sweep / "config.yaml")
    results = pd.read_csv(quickstart_sweep / "results.csv", dtype={"trial_id": str})
    ran = results[results["sharpening.strategy"] == "per_class"]
    point = ran.iloc[0][list(cfg.search.space)]
    params = {k: v.item() if hasattr(v, "item") else v for k, v in point.items()}
    reported: list[dict] = []
    trial_run.run_trial(C.apply_params(cfg, params), reported.append, "again")
    assert [r["cycle"] for r in reported] == list(ran["cycle"])
    for row, (_, earlier) in zip(reported, ran.iterrows(), strict=True):
        for name in ("interp/u", "val/accuracy", "delta/interp/u", "sae/fvu"):
            assert row[name] == pytest.approx(earlier[name], rel=1e-12), name
        assert row["artifacts/computed"] == 0 and row["time/sae_s"] == 0.0
    seeds = quickstart_sweep / "seeds"
    for cycle in ran["cycle"]:  # its seeds' rows, where this trial's go
        again = json.loads((seeds / f"again-c{cycle}.json").read_text())
        first = json.loads((seeds / f"{ran.iloc[0]['trial_id']}-c{cycle}.json").read_text())
        assert again == first
        (seeds / f"again-c{cycle}.json").unlink()  # the session's sweep stays as it was


def test_quickstart_shares_the_cycle0_model(quickstart_sweep):
    """4 trials with fixed cycle-0 settings: one cycle-0 fine-tune, one extraction of its
    activations and one SAE fit training every point's SAE on them, counted from the
    artifact store (not from logs). The store is where the
    YAML's relative `./runs` says, in the folder the user launched from."""
    from sae_ray.storage.artifacts import DONE

    artifacts = quickstart_sweep / "artifacts"
    assert artifacts.is_dir() and (quickstart_sweep / "train_runs").is_dir()

    def specs(kind):
        return {
            p.name.split("-", 1)[1]: json.loads((p / "spec.json").read_text())
            for p in artifacts.glob(f"{kind}-*")
            if (p / DONE).exists()
        }

    models = specs("model")
    cycle0 = [key for key, spec in models.items() if "parent" not in spec]
    assert len(cycle0) == 1  # fine-tuned once for all 4 trials
    # plus one cycle-1 model per trial; the 3 strategies' paired λ = 0 models are the
    # control trial's own (shared artifacts), not 3 more
    assert len(models) == 1 + 4
    activations = specs("activations")
    (acts0,) = [key for key, spec in activations.items() if spec["parent"] == cycle0[0]]
    assert len(activations) == 1 + 4
    # the points' 3 SAE settings read the cycle-0 activations: one fit trained all 3
    fits = [k for k, spec in specs("sae").items() if spec["parent"] == acts0]
    assert len(fits) == 3
    for key in fits:
        metrics = json.loads((artifacts / f"sae-{key}" / "train_metrics.json").read_text())
        assert metrics["co_trained"] == 3
    # each trial's point was on record only while it ran
    assert not list((quickstart_sweep / "train_runs").glob("point-*"))
    # each (model, SAE) evaluated once: cycle 0's 3, cycle 1's 4 models and the 2 control
    # SAEs of the settings the control trial does not have (11 evaluations without sharing)
    assert len(specs("evaluation")) == 3 + 4 + 2
    # each artifact was computed by exactly one trial, and the trials say so in results.csv
    results = pd.read_csv(quickstart_sweep / "results.csv")
    stored = sum(
        1 for p in artifacts.iterdir() if (p / DONE).exists() and not p.name.startswith("trial-")
    )
    assert len(list(artifacts.glob("trial-*"))) == 4  # each trial's record (method/replay.py)
    assert results["artifacts/computed"].sum() == stored
    for stage in ("model", "activations", "sae", "evaluate"):
        assert (results[f"time/{stage}_s"] > 0).all(), stage


def test_quickstart_leaves_nothing_in_tunes_trial_working_dirs(quickstart_sweep):
    """Tune runs each trial in a working dir of its own under Ray's temp folder; a relative
    path read there would put the sweep's files out of the user's reach."""
    from tests.conftest import ray_session_dir

    results = pd.read_csv(quickstart_sweep / "results.csv")
    trials = set(results["trial_id"])
    dirs = [
        d
        for d in ray_session_dir().glob("artifacts/*/quickstart/working_dirs/*")
        if d.name.removeprefix("trial_") in trials
    ]
    assert len(dirs) == len(trials)  # Tune made them: the check looks in the right place
    left = [str(p) for d in dirs for p in d.rglob("*") if p.is_file()]
    assert not left, left[:10]


# What only Ray and the libraries print: their own logs belong in Ray's log files.
RAY_INTERNAL = (
    "(raylet)",
    "pid=",
    "Requesting resources",
    "worker group",
    "TrainingReport",
    "Starting execution of Dataset",
    "execution finished",
    "Configuration for experiment",
    "View detailed results",
    "tensorboard",
    "Warning:",
    "WARNING",
)


def test_quickstart_console_is_for_people(quickstart_sweep):
    """The README's command prints the sweep's progress, its table, the best trial and where
    the outputs are: at most 80 lines, none of them Ray's own."""
    console = (quickstart_sweep.parents[1] / "console.log").read_text().splitlines()
    noisy = [line for line in console if any(m in line for m in RAY_INTERNAL)]
    assert not noisy, noisy[:10]
    assert len(console) <= 80, "\n".join(console)
    text = "\n".join(console)
    lines = ("memory per worker:", "started (sae.k=", "cycle 2/2:", "best trial:", "results: ")
    for needed in (*lines, "report: "):
        assert needed in text, needed


def test_quickstart_wandb_runs_carry_the_flat_config_and_every_cycle(quickstart_sweep):
    """One offline run per trial in its trial folder (grouped by sweep, the whole config
    under dotted keys, a history row per cycle) and the sweep's summary run."""
    from tests.wandb_records import run_contents

    results = pd.read_csv(quickstart_sweep / "results.csv")
    runs = list(quickstart_sweep.glob("trial_*/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 4
    for run in runs:
        config, history, _ = run_contents(run)
        trial = results[results["trial_id"] == config["trial_id"]]
        for key in ("sae.k", "sae.expansion_factor", "sharpening.strategy"):  # searched
            assert config[key] == trial[key].iloc[0], key
        assert config["model.name"] == "tiny-gpt2" and config["cycles.count"] == 2  # fixed
        cycles = [row for row in history if "cycle" in row]
        assert [row["cycle"] for row in cycles] == [0, 1]
        assert [row["interp/u"] for row in cycles] == pytest.approx(trial["interp/u"].tolist())
    summary = list((quickstart_sweep / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(summary) == 1
    _, history, best = run_contents(summary[0])
    assert any(row.get("results/_type") == "table-file" for row in history)
    assert best["best/trial_id"] in set(results["trial_id"])


def test_quickstart_sweep_writes_its_report(quickstart_sweep, tmp_path):
    from tests.browser import check_rendered
    from tests.test_report import check_page

    index = quickstart_sweep / "report" / "index.html"
    links = check_page(str(index), lambda p: Path(p).read_bytes())
    assert {"cycles.png", "front.png", "control.png", "density.png", "structure.png"} <= set(links)
    shown = check_rendered(index, tmp_path / "quickstart-report.png")  # in headless Chromium
    assert {image["src"] for image in shown.images} == {u for u in links if u.endswith(".png")}


def test_quickstart_finetunes_on_ray_train_at_equal_compute(quickstart_sweep):
    """Every model was trained by the trial's 2-worker Train run (its history holds the per-epoch
    validation accuracy it was chosen on), and the λ = 0 control took as many steps as the
    sharpened trials."""
    from sae_ray.method.finetune import HISTORY

    results = pd.read_csv(quickstart_sweep / "results.csv")
    models = [p for p in (quickstart_sweep / "artifacts").glob("model-*") if p.is_dir()]
    for model in models:
        history = json.loads((model / HISTORY).read_text())
        assert [h["epoch"] for h in history] == [0, 1, 2]
        assert all(0 <= h["val_accuracy"] <= 1 for h in history)
    cycle1 = results[results["cycle"] == 1]
    assert cycle1["finetune/steps"].nunique() == 1 and cycle1["finetune/steps"].iloc[0] > 0
    sharpened = cycle1[~cycle1["is_control"]]
    assert (sharpened["finetune/aux"] > 0).all() and cycle1[cycle1["is_control"]][
        "finetune/aux"
    ].isna().all()
    targets = list((quickstart_sweep / "artifacts").glob("targets-*"))
    assert len(targets) == 3  # per_class, per_example, random: the control needs none
    assert not list((quickstart_sweep / "train_runs").iterdir())  # cleaned up


def test_sae_ray_run_evaluates_on_the_workers_as_one_process_would(ray_cluster, tmp_path):
    """`sae-ray run` (one trial, no Tune) of a strategy under 2 seeds with BatchTopK SAEs
    succeeds: each cycle's row is the mean of its seeds' rows (seeds.csv), cycle 1 carries
    the paired λ = 0 control and the difference to it, comparison.csv pairs the seeds, the
    targets sharpen the codes, and the metrics the Train worker
    computed for seed 0 equal the single-process evaluation of the same artifacts,
    recomputed here."""
    import math
    import subprocess
    import sys

    from sae_ray import config as C
    from sae_ray.lm.models import hookpoint, load_classifier, resolve_layer
    from sae_ray.lm.text_data import load_text_data
    from sae_ray.sae.model import SparseAutoencoder
    from sae_ray.storage.artifacts import Artifact
    from sae_ray.trial.evaluation import classifier_metrics
    from tests.conftest import QUICKSTART, ROOT

    overrides = [
        f"experiment.storage_path={tmp_path}",
        "experiment.name=one",
        "dataset.num_examples=400",
        "cycles.count=2",
        "search.seeds=2",
        "cycles.epochs=1",
        "sae.epochs=2",
        "sae.architecture=batchtopk",
        "wandb.mode=disabled",
    ]
    address = ray_cluster.get_runtime_context().gcs_address
    done = subprocess.run(
        [sys.executable, "-m", "sae_ray", "run", str(QUICKSTART), *overrides, "--address", address],
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cycle 0:" in done.stdout and "best trial: run" in done.stdout
    one = tmp_path / "one"
    results = pd.read_csv(one / "results.csv")
    assert list(results["cycle"]) == [0, 1] and (results["status"] == "COMPLETE").all()
    assert (results["n_seeds"] == 2).all()
    seeds = pd.read_csv(one / "seeds.csv")
    pairs = sorted(zip(seeds["cycle"], seeds["seed"], strict=True))
    assert pairs == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for cycle in (0, 1):
        mine = seeds[seeds["cycle"] == cycle]
        for name in ("interp/u", "val/accuracy", "sae/fvu", "delta/interp/u"):
            assert math.isclose(results.loc[cycle, name], mine[name].mean(), rel_tol=1e-9)
    assert (seeds.loc[seeds["cycle"] == 0, "delta/interp/u"] == 0).all()  # its own pair
    first = seeds[seeds["cycle"] == 0]  # targets built from BatchTopK's varying codes
    assert (first["targets/kept_latents"] > 0).all() and (first["targets/recon_cos"] < 1).all()
    later = seeds[seeds["cycle"] == 1]
    assert later["control/interp/u"].notna().all() and later["delta/interp/u"].ne(0).all()
    diff = later["interp/u"] - later["control/interp/u"]
    assert np.allclose(later["delta/interp/u"], diff)
    table = pd.read_csv(one / "comparison.csv").set_index(["strategy", "metric"])
    pair = table.loc[("per_class", "interp/u")]
    assert pair["n"] == 2 and math.isclose(pair["mean"], later["delta/interp/u"].mean())

    cfg = C.load(one / "config.yaml")
    store = one / "artifacts"
    published = [p for p in store.glob("*-*") if (p / "spec.json").is_file()]
    specs = {p: json.loads((p / "spec.json").read_text()) for p in published}
    assert sum(p.name.startswith("model-") for p in specs) == 6  # 2 seeds x (c0, c1, control)
    models = {p: s for p, s in specs.items() if p.name.startswith("model-")}
    (model,) = [p for p, s in models.items() if s.get("seed") == 0]  # cycle 0 of seed 0
    acts = _child(specs, "activations", model)
    sae = _child(specs, "sae", acts)
    clf = load_classifier(model)
    hp = hookpoint(clf.model, resolve_layer(clf.model, cfg.model.layer))
    data = load_text_data(cfg.dataset)
    here = classifier_metrics(
        cfg, data, clf, SparseAutoencoder.load(sae), Artifact(str(acts), "a"), hp
    )
    assert len(here) > 40 and SparseAutoencoder.load(sae).cfg.architecture == "batchtopk"
    row = seeds[(seeds["cycle"] == 0) & (seeds["seed"] == 0)].iloc[0]
    for name, value in here.items():
        if isinstance(value, str):  # the density histogram's JSON
            assert row[name] == value, name
        elif math.isnan(value):  # absorption, with too few letters on the tiny model
            assert math.isnan(row[name]), name
        else:
            assert math.isclose(row[name], value, rel_tol=1e-4, abs_tol=1e-6), (
                name,
                row[name],
                value,
            )


def _child(specs: dict, kind: str, parent: Path) -> Path:
    key = parent.name.split("-", 1)[1]
    (found,) = [p for p, s in specs.items() if p.name.startswith(f"{kind}-") and s["parent"] == key]
    return found


def test_a_sweeps_sae_stream_is_shuffled_seeded_and_whole(ray_cluster, tmp_path):
    """Stored token rows come example by example (a run of one text's tokens); a sweep's
    SAE fit through Ray Data (`sae.feed: ray_data`) draws them through a seeded shuffle
    buffer: every row once per epoch, not in stored order, the same order for the same
    seed and epoch (co-fits stay bit for bit)."""
    from sae_ray.config import Config
    from sae_ray.sae.feeds import ActivationFeed, activation_dataset
    from sae_ray.trial.sae_fit import sae_train_config

    n = 6000
    x = np.zeros((n, 4), np.float32)
    x[:, 0] = np.arange(n)
    _write_tokens(tmp_path / "tokens", x, shard_rows=2000)
    dataset, _ = activation_dataset(tmp_path / "tokens", ["x"])
    cfg = Config.model_validate({"experiment": {"name": "s"}, "sae": {"batch_size": 500}})

    def order(seed: int, epoch: int) -> np.ndarray:
        fit = sae_train_config(
            cfg.model_copy(update={"experiment": cfg.experiment.model_copy(update={"seed": seed})}),
            "x",
            4,
            cycle=0,
        )
        feed = ActivationFeed(fit, world=1, device=torch.device("cpu"))
        rows = [b["x"][:, 0].numpy() for b in feed.batches(dataset, epoch)]
        return np.concatenate(rows).astype(int)

    first = order(0, 0)
    assert sorted(first) == list(range(n))
    runs = np.mean(np.diff(first) == 1)  # neighbours that were neighbours on disk
    assert runs < 0.05, runs
    np.testing.assert_array_equal(first, order(0, 0))
    assert not np.array_equal(first, order(0, 1)) and not np.array_equal(first, order(1, 0))


def test_a_local_start_says_nothing_of_token_auth():
    """Ray's token-auth note opens every local start's console; it asks nothing of the user:
    it goes to Ray's log with the rest."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    # a user's shell: no RAY_ADDRESS, and RAY_AUTH_MODE unset (Ray then turns token auth
    # on by itself, and says so)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    code = (  # the console the CLI sets up (main.py), then its start of Ray
        "import logging; logging.basicConfig(level=logging.WARNING); "
        "from sae_ray.cli.ray_session import connect; import ray; "
        "connect(None); print('joined', len(ray.nodes())); ray.shutdown()"
    )
    short = tempfile.mkdtemp(prefix="sr-", dir="/tmp")  # Ray's socket paths live under it
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            env={**env, "TMPDIR": short},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert done.returncode == 0 and "joined 1" in done.stdout, done.stderr[-2000:]
    assert "Token authentication" not in done.stdout + done.stderr
