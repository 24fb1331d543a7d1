"""Language-model mode end to end: `sae-ray sweep sweeps/cpt_quickstart.yaml` on the test
cluster (smaller: fewer documents and epochs, one worker per trial), then `sae-ray
intervene` and the report on what it wrote."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, ray_env

pytestmark = pytest.mark.ray

SMALLER = [
    "dataset.num_examples=240",
    "cycles.epochs=1",
    "sae.epochs=2",
    "resources.num_workers=1",
    # random's CPT gradient is tested without Ray (tests/test_cpt.py): 3 trials here
    "search.space={sharpening.strategy: {type: choice, values: [topk_sharp, l1, none]}}",
]
LM_COLUMNS = ["val/perplexity", "test/perplexity", "perplexity_change_pct", "sae/steps_to_fvu"]


@pytest.fixture(scope="module")
def cpt_sweep(ray_cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cpt")
    env = {**ray_env(), "RAY_ADDRESS": ray_cluster.gcs_address}
    sae_ray = str(Path(sys.executable).parent / "sae-ray")
    yaml = str(ROOT / "sweeps" / "cpt_quickstart.yaml")
    done = subprocess.run(
        [sae_ray, "sweep", yaml, "experiment.storage_path=./runs", *SMALLER],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-4000:]
    return workdir / "runs" / "cpt_quickstart", console


def test_cpt_sweep_reports_lm_metrics_for_every_trial_and_cycle(cpt_sweep):
    sweep, console = cpt_sweep
    rows = pd.read_csv(sweep / "results.csv")
    assert set(rows["sharpening.strategy"]) == {"topk_sharp", "l1", "none"}
    assert (rows["status"] == "COMPLETE").all()
    assert sorted(rows["cycle"].unique()) == [0, 1] and len(rows) == 6
    for column in LM_COLUMNS:
        assert rows[column].notna().all(), column
    assert (rows.loc[rows["cycle"] == 0, "perplexity_change_pct"] == 0).all()
    later = rows[rows["cycle"] == 1]
    assert (later["perplexity_change_pct"] != 0).all()  # CPT moved every model
    assert (rows["val/perplexity"] > 1).all() and (rows["sae/steps_to_fvu"] >= 1).all()
    assert "val/accuracy" not in rows or rows["val/accuracy"].isna().all()
    # the aux term trained the strategies, not the control, with equal steps
    steps = later.set_index("sharpening.strategy")["finetune/steps"]
    assert steps.nunique() == 1
    aux = later.set_index("sharpening.strategy")["finetune/aux"]
    assert aux.drop("none").notna().all() and pd.isna(aux["none"])
    # paired against the λ = 0 model of the same seed and cycle
    control = later.set_index("sharpening.strategy")["val/perplexity"]["none"]
    assert later["control/val/perplexity"].tolist() == pytest.approx([control] * 3)
    # config/metrics.py lists exactly what an LM sweep writes (the histogram is a JSON
    # string, not a metric to select on)
    from sae_ray.config.metrics import known_metrics

    rest = ["trial_id", "cycle", "sharpening.strategy", "strategy_effective", "is_control"]
    rest += ["n_seeds", "nodes", "feasible", "constraint/violation", "status", "error"]
    rest += ["features/log10_density_hist"]
    written = sorted(c for c in rows.columns if c not in rest)
    assert written == sorted(known_metrics(lm=True))
    assert "val/perplexity" in console  # the progress table shows the LM's own metric


def test_intervene_writes_the_curve_and_picks_k_sharp(cpt_sweep, tmp_path):
    sweep, _ = cpt_sweep
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "sae-ray"),
            "intervene",
            str(sweep),
            "--k_sharp",
            "1,4,8",
            "--max_degradation_pct",
            "100",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    curve = pd.read_csv(tmp_path / "cycle0.csv")
    assert (tmp_path / "cycle0.png").stat().st_size > 1000
    assert set(curve["kind"]) == {"sharpened", "reconstruction", "clean"}
    sharp = curve[curve["kind"] == "sharpened"].set_index("k_sharp")["perplexity"]
    full = curve[curve["kind"] == "reconstruction"]["perplexity"].iloc[0]
    assert sharp[8] == pytest.approx(full)  # k_sharp = k is the full reconstruction
    assert sharp[1] > sharp[8]
    assert "lowest k_sharp within 100% of clean perplexity: k_sharp=" in done.stdout


def test_report_draws_perplexity_against_interpretability(cpt_sweep):
    sweep, _ = cpt_sweep
    index = (sweep / "report" / "index.html").read_text()
    assert "front.png" in index and (sweep / "report" / "front.png").is_file()
    assert "val/perplexity" in index
    best = json.loads((sweep / "best.json").read_text())
    assert best["best"]["trial_id"]
