import subprocess
import sys
from pathlib import Path

import pytest

from sae_ray import config as C
from sae_ray.sweep.space import search_space
from sae_ray.sweep.tuner import max_concurrent_trials
from tests.conftest import QUICKSTART


def _write(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_quickstart_validates_with_overrides():
    cfg = C.load(QUICKSTART, ["sae.k=16", "cycles.aux_weight=0.25", "wandb.mode=disabled"])
    assert cfg.sae.k == 16 and cfg.cycles.aux_weight == 0.25 and cfg.wandb.mode == "disabled"
    assert cfg.experiment.storage_path == str(Path.cwd().resolve() / "runs")  # YAML: ./runs
    assert set(search_space(cfg)) == {"sae.k", "sae.expansion_factor", "sharpening.strategy"}


def test_local_paths_are_anchored_where_the_sweep_is_launched(tmp_path, monkeypatch):
    """Tune runs trials in working dirs of their own: a relative path must reach them as the
    launching directory's, while hub ids, presets and buckets stay as written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "reviews.csv").write_text("text,label\na,0\nb,1\n")
    (tmp_path / "gpt2").mkdir()  # a local folder shadows the hub id, as in transformers
    cfg = C.load(
        _write(tmp_path, "experiment: {name: x, storage_path: out/../runs}\n"),
        ["dataset.name=data/reviews.csv", "model.name=gpt2"],
    )
    assert cfg.experiment.storage_path == str(tmp_path.resolve() / "runs")
    assert cfg.sweep_uri == str(tmp_path.resolve() / "runs" / "x")
    assert cfg.dataset.name == str(tmp_path.resolve() / "data" / "reviews.csv")
    assert cfg.model.name == str(tmp_path.resolve() / "gpt2")
    kept = C.load(
        _write(tmp_path, "experiment: {name: x, storage_path: 's3://b/p'}\n"),
        ["dataset.name=nyu-mll/glue:sst2", "model.name=pythia-70m"],
    )
    assert kept.experiment.storage_path == "s3://b/p"
    assert (kept.dataset.name, kept.model.name) == ("nyu-mll/glue:sst2", "pythia-70m")
    monkeypatch.chdir(tmp_path / "data")  # what a trial's own working dir would do
    assert cfg.sweep_uri == str(tmp_path.resolve() / "runs" / "x")


def test_empty_storage_path_is_refused(tmp_path):
    with pytest.raises(C.ConfigError, match="experiment.storage_path"):
        C.load(_write(tmp_path, "experiment: {name: x, storage_path: ''}\n"))


def test_a_relative_storage_path_in_a_ray_job_warns(tmp_path, monkeypatch, capsys):
    """In a submitted job the working dir is Ray's uploaded copy: results would vanish."""
    from sae_ray.cli import main as cli

    monkeypatch.chdir(tmp_path)
    cfg = C.load(QUICKSTART)
    cli._warn_if_inside_job(cfg)
    assert capsys.readouterr().err == ""  # not in a job
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    cli._warn_if_inside_job(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: experiment.storage_path:"), err
    cli._warn_if_inside_job(C.load(QUICKSTART, [f"experiment.storage_path={tmp_path.parent}"]))
    assert capsys.readouterr().err == ""  # an absolute path outside the job's folder


@pytest.mark.parametrize(
    "text, field",
    [
        ("experiment: {name: x}\nsae: {kk: 3}\n", "sae.kk: unknown key"),
        ("experiment: {name: x}\nsae: {k: many}\n", "sae.k"),
        ("experiment: {name: x}\nsharpening: {strategy: blur}\n", "sharpening.strategy"),
        ("experiment: {name: x}\nbogus: {}\n", "bogus: unknown key"),
        ("model: {name: tiny-gpt2}\n", "experiment: Field required"),
        (
            "experiment: {name: x}\nsearch: {space: {sae.nope: {type: choice, values: [1]}}}\n",
            "search.space.sae.nope",
        ),
        (
            "experiment: {name: x}\nsearch: {space: {sae.k: {type: choice, values: [0, 8]}}}\n",
            "search.space.sae.k",
        ),
        (
            "experiment: {name: x}\nsearch: {space: {sae.k: {type: int, low: 9, high: 2}}}\n",
            "search.space.sae.k",
        ),
        (
            "experiment: {name: x, storage_path: 'ftp://host/runs'}\n",
            "experiment.storage_path: unsupported scheme 'ftp'",
        ),
        ("experiment: {name: x, storage_path: 's3:///runs'}\n", "experiment.storage_path"),
    ],
)
def test_bad_config_names_the_field(tmp_path, text, field):
    with pytest.raises(C.ConfigError) as err:
        C.load(_write(tmp_path, text))
    assert field in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "text, field",
    [
        ("experiment: {name: x}\nsae: {kk: 3}\n", "sae.kk"),
        ("experiment: {name: x}\ncycles: {count: [1]}\n", "cycles.count"),
    ],
)
def test_cli_bad_yaml_exits_2_with_one_line(tmp_path, text, field):
    proc = subprocess.run(
        [sys.executable, "-m", "sae_ray", "sweep", str(_write(tmp_path, text))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_bad_override_and_missing_file(tmp_path):
    from sae_ray.cli import main as cli

    assert cli.main(["run", str(QUICKSTART), "sae.k=-1"]) == 2
    assert cli.main(["sweep", str(tmp_path / "missing.yaml")]) == 2


def test_empty_space_refused():
    cfg = C.load(QUICKSTART, ["search.space={}", "search.points_to_evaluate=[]"])
    with pytest.raises(C.ConfigError, match="search.space"):
        search_space(cfg)


def test_concurrency_leaves_a_cpu_for_ray_data():
    cfg = C.load(QUICKSTART)
    assert max_concurrent_trials(cfg, {"CPU": 2}) == 1
    assert max_concurrent_trials(cfg, {"CPU": 16}) == 15
    with pytest.raises(C.ConfigError, match="resources.num_workers"):
        max_concurrent_trials(cfg, {"CPU": 1})
    gpu = C.load(QUICKSTART, ["resources.use_gpu=true"])
    assert max_concurrent_trials(gpu, {"CPU": 32, "GPU": 4}) == 2


def test_architecture_is_searched_like_any_key_with_jumprelus_knobs_conditional():
    """sae.architecture as a search dimension; target_l0 sampled only for the JumpReLUs
    (checked as it is sampled: a `when` entry's values against its parent's value)."""
    space = (
        "search.space={sae.architecture: {type: choice, values: [topk, batchtopk, jumprelu, "
        "matryoshka]}, sae.target_l0: {type: choice, values: [4, 8], "
        "when: {sae.architecture: jumprelu}}}"
    )
    cfg = C.load(QUICKSTART, [space, "search.points_to_evaluate=[]"])
    for arch in ("topk", "batchtopk", "matryoshka"):
        assert C.apply_params(cfg, {"sae.architecture": arch}).sae.target_l0 is None
    one = C.apply_params(cfg, {"sae.architecture": "jumprelu", "sae.target_l0": 8})
    assert one.sae.architecture == "jumprelu" and one.sae.target_l0 == 8
    with pytest.raises(C.ConfigError, match="sae.target_l0: only a jumprelu"):
        C.apply_params(cfg, {"sae.architecture": "topk", "sae.target_l0": 8})


def test_apply_params_sets_dotted_values():
    cfg = C.load(QUICKSTART)
    trial = C.apply_params(cfg, {"sae.k": 4, "sharpening.strategy": "none"})
    assert trial.sae.k == 4 and trial.sharpening.strategy == "none"
    with pytest.raises(C.ConfigError):
        C.apply_params(cfg, {"sae.k": 0})


def test_control_trial_is_added_first_at_the_first_points_settings():
    from sae_ray.sweep.tuner import with_control

    cfg = C.load(
        QUICKSTART,
        [
            "search.space={sae.k: {type: choice, values: [4, 8]}, "
            "sharpening.strategy: {type: choice, values: [per_class, random]}}",
            "search.points_to_evaluate=[{sae.k: 8, sharpening.strategy: random}]",
        ],
    )
    out = with_control(cfg)
    assert out.search.points_to_evaluate[0] == {"sae.k": 8, "sharpening.strategy": "none"}
    assert out.search.points_to_evaluate[1:] == cfg.search.points_to_evaluate
    assert out.search.space["sharpening.strategy"].values == ["per_class", "random", "none"]
    assert out.search.num_samples == cfg.search.num_samples + 1
    assert C.apply_params(out, out.search.points_to_evaluate[0]).sharpening.strategy == "none"
    # a sweep that does not search the strategy gets it as (its strategy | none)
    fixed = with_control(
        C.load(
            QUICKSTART,
            ["search.space={sae.k: {type: choice, values: [4]}}", "search.points_to_evaluate=[]"],
        )
    )
    assert fixed.search.space["sharpening.strategy"].values == ["per_class", "none"]
    assert fixed.search.points_to_evaluate == [{"sharpening.strategy": "none"}]
    # already present (the quickstart seeds one), or turned off: unchanged
    assert with_control(C.load(QUICKSTART)) == C.load(QUICKSTART)
    off = C.load(QUICKSTART, ["search.control=false", "search.points_to_evaluate=[]"])
    assert with_control(off) == off


@pytest.mark.parametrize("path", sorted((QUICKSTART.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_file_validates(path):
    cfg = C.load(path)
    assert search_space(cfg)
    for point in cfg.search.points_to_evaluate:
        C.apply_params(cfg, point)  # each seeded point is a valid trial
