"""The sweep report, live progress and the W&B summary run, on a sweep's real output files
(written by the sweep's own writers from made-up numbers: tests/report_fixture.py)."""

from __future__ import annotations

import io
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sae_ray import storage
from sae_ray.cli import main as cli
from sae_ray.sweep.report import build_report, comparison_table, load_sweep, strategy_table
from tests.report_fixture import fake_sweep
from tests.wandb_records import run_contents


def check_page(index: str, read) -> list[str]:
    """Every file index.html links exists; every PNG is a real, non-blank figure."""
    page = read(index).decode()
    links = re.findall(r'(?:src|href)="([^"#]+)"', page)
    assert links and not [u for u in links if "://" in u or u.startswith("/")]  # offline
    base = index.rsplit("/", 1)[0]
    for link in links:
        data = read(f"{base}/{link}")
        if link.endswith(".png"):
            image = Image.open(io.BytesIO(data))
            image.verify()
            image = Image.open(io.BytesIO(data)).convert("L")
            assert image.width >= 500 and image.height >= 300, link
            pixels = np.asarray(image, dtype=float)
            assert pixels.std() > 10 and (pixels < 128).mean() > 0.005, f"{link} looks blank"
    return links


def test_report_links_only_real_non_blank_figures(tmp_path, monkeypatch):
    from sae_ray.sweep import figures

    cfg = fake_sweep(str(tmp_path))
    page = Path(build_report(cfg.sweep_uri)[0]).read_text()
    assert "importance_0.png" not in page and "needs 20 completed trials, has 6" in page
    monkeypatch.setattr(figures, "IMPORTANCE_TRIALS", 2)  # drawn where the trials support it
    index, pages = build_report(cfg.sweep_uri)
    assert Path(index) == cfg.sweep_dir / "report" / "index.html" and pages == Path(index).parent
    links = check_page(index, lambda p: Path(p).read_bytes())
    assert {"cycles.png", "front.png", "control.png", "importance_0.png"} <= set(links)
    assert {"density.png", "structure.png"} <= set(links)  # the dictionaries
    assert set(links) == {p.name for p in pages.glob("*.png")}  # nothing drawn and not shown
    page = Path(index).read_text()
    assert "deadbeef" in page and "model.layer: 5 is out of range" in page  # the error


def test_report_renders_in_a_browser(tmp_path):
    """Headless Chromium: every figure loads, every table renders (the quickstart's own
    report gets the same check in test_ray_e2e)."""
    from tests.browser import check_rendered

    cfg = fake_sweep(str(tmp_path))
    index, _ = build_report(cfg.sweep_uri)
    shown = check_rendered(Path(index), tmp_path / "report.png")
    drawn = {image["src"] for image in shown.images}
    assert {"cycles.png", "control.png", "density.png", "structure.png"} <= drawn
    assert len(shown.tables) >= 3  # comparison, strategies, by setting, trials


def test_trials_are_sorted_by_the_objective_and_strategies_compared_with_the_control(tmp_path):
    cfg = fake_sweep(str(tmp_path))
    index, _ = build_report(cfg.sweep_uri)
    trials_section = Path(index).read_text().split("<h2>Trials</h2>")[1]
    shown = re.findall(r"<td>([0-9a-f]{8})</td>", trials_section)
    results = pd.read_csv(cfg.sweep_dir / "results.csv")
    by_score = results[results["cycle"] == 2].sort_values("interp/u", ascending=False)
    assert shown == [*by_score["trial_id"], "deadbeef"]  # the failed trial last

    final = results[results["cycle"] == 2]
    control = final[final["sharpening.strategy"] == "none"]["interp/u"].mean()
    per_class = final[final["sharpening.strategy"] == "per_class"]["interp/u"].mean()
    table = strategy_table(load_sweep(cfg.sweep_uri, tmp_path)).set_index("strategy")
    assert table.loc["per_class", "Δ interp/u vs control"] == pytest.approx(per_class - control)
    assert table.loc["per_class", "trials"] == 2 and np.isnan(
        table.loc["none"].get("Δ interp/u vs control", np.nan)
    )


def test_the_reports_comparison_is_comparison_csv(tmp_path):
    """Both pair the seeds (each seed's points averaged: n = seeds), from the same rows."""
    cfg = fake_sweep(str(tmp_path), seeds=3)
    build_report(cfg.sweep_uri)
    written = pd.read_csv(cfg.sweep_dir / "comparison.csv")
    shown = comparison_table(load_sweep(cfg.sweep_uri, tmp_path))
    pd.testing.assert_frame_equal(shown, written, check_dtype=False)
    per_class = written.set_index(["strategy", "metric"]).loc[("per_class", "interp/u")]
    assert per_class["n"] == 3 and per_class["n_points"] == 2  # 2 trials at each of 3 seeds
    by = pd.read_csv(cfg.sweep_dir / "comparison_by_setting.csv")
    shown = comparison_table(load_sweep(cfg.sweep_uri, tmp_path), by_setting=True)
    pd.testing.assert_frame_equal(shown, by, check_dtype=False)
    assert list(by.columns[:2]) == ["sae.k", "sae.expansion_factor"]  # the searched choices
    assert by[(by["strategy"] == "per_class") & (by["metric"] == "interp/u")]["n"].sum() == 6
    assert set(by["n_points"]) == {1}  # one point per setting and seed
    assert "comparison_by_setting.csv" in (cfg.sweep_dir / "report" / "index.html").read_text()


def test_report_command_reads_and_writes_a_bucket(s3_server, tmp_path, capsys):
    cfg = fake_sweep("s3://sae-ray-test/reports")
    assert cli.main(["report", cfg.sweep_uri]) == 0
    index = f"{cfg.sweep_uri}/report/index.html"
    assert f"report: {index}" in capsys.readouterr().out
    check_page(index, storage.read_bytes)


def test_report_of_a_directory_that_is_no_sweep_exits_2(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results.csv: not found" in err[0]


DAMAGE = {
    "results.csv ragged": ("results.csv", b'trial_id,cycle\n"a,0\n\x00\xff'),
    "results.csv empty": ("results.csv", b""),
    "results.csv other table": ("results.csv", b"a,b\n1,2\n"),
    "results.csv not text": ("results.csv", b"\xff\xfe\x00\x00garbage"),
    "config.yaml not yaml": ("config.yaml", b"experiment: {name: [\n"),
    "config.yaml not a config": ("config.yaml", b"experiment: {nom: x}\n"),
    "best.json truncated": ("best.json", b'{"best": {"trial_id": '),
    "best.json a list": ("best.json", b"[1, 2]"),
}


@pytest.mark.parametrize("name", DAMAGE)
def test_report_of_a_damaged_sweep_is_one_line_and_leaves_no_scratch(
    tmp_path, capsys, monkeypatch, name
):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # where the report draws before publishing
    monkeypatch.setattr(tempfile, "tempdir", None)
    cfg = fake_sweep(str(tmp_path / "runs"))
    file, content = DAMAGE[name]
    (cfg.sweep_dir / file).write_bytes(content)
    assert cli.main(["report", str(cfg.sweep_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {cfg.sweep_dir / file}: "), err
    assert not list(scratch.iterdir())  # no sae-ray-report-* folder left behind
    assert not (cfg.sweep_dir / "report").exists()


def test_report_out_under_a_file_is_one_line(tmp_path, capsys):
    cfg = fake_sweep(str(tmp_path / "runs"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert cli.main(["report", str(cfg.sweep_dir), "--out", str(blocker / "report")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "a-file" in err[0], err


def test_live_progress_shows_counts_parameters_cycles_and_the_best_so_far():
    from sae_ray.config import Objective
    from sae_ray.sweep.progress import SweepProgress

    out = io.StringIO()
    goals = [Objective(metric="interp/u", mode="max")]
    progress = SweepProgress("qs", ["sae.k"], goals, cycles=2, every=0.0, out=out)

    def trial(i, k):
        return SimpleNamespace(trial_id=f"t{i}", config={"sae.k": k}, path=f"/runs/qs/trial_t{i}")

    a, b, c = trial(1, 4), trial(2, 8), trial(3, 16)
    for t in (a, b, c):
        progress.on_trial_start(0, [], t)
    progress.on_trial_result(0, [], a, {"cycle": 0, "interp/u": 0.30, "val/accuracy": 0.9})
    progress.on_trial_result(0, [], b, {"cycle": 1, "interp/u": 0.41, "val/accuracy": 0.8})
    progress.on_trial_result(0, [], c, {"cycle": 0, "interp/u": 0.99, "feasible": False})
    progress.on_trial_complete(0, [], b)
    progress.on_trial_error(0, [], c)
    last = progress.render()
    assert "1 running, 1 done, 1 errored" in last
    assert "best interp/u = 0.41 (trial_t2)" in last  # the infeasible 0.99 is never best
    line = next(ln for ln in last.splitlines() if ln.startswith("trial_t1"))
    assert "running" in line and "1/2" in line and " 4 " in f" {line} "
    assert "trial_t3 failed; the sweep goes on" in out.getvalue()


def test_wandb_summary_run_holds_the_table_figures_and_best(tmp_path, monkeypatch):
    from sae_ray.sweep.wandb_log import flat_config, log_summary

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = fake_sweep(str(tmp_path))
    _, pages = build_report(cfg.sweep_uri)
    rows = pd.read_csv(cfg.sweep_dir / "results.csv").to_dict("records")
    run_dir = Path(log_summary(cfg, rows, pages))
    assert run_dir.parent == cfg.sweep_dir / "wandb" and run_dir.name.startswith("offline-run-")
    config, history, summary = run_contents(next(run_dir.glob("run-*.wandb")))
    assert config["sae.k"] == cfg.sae.k and config["cycles.count"] == 3
    assert set(flat_config(cfg)) <= set(config)
    logged = {k: v for row in history for k, v in row.items()}
    assert logged["results/_type"] == "table-file" and logged["results/nrows"] == len(rows)
    for png in pages.glob("*.png"):
        assert logged[f"report/{png.stem}/_type"] == "image-file", png.name
    results = pd.read_csv(cfg.sweep_dir / "results.csv")
    final = results[results["cycle"] == 2]
    assert summary["best/trial_id"] == final.loc[final["interp/u"].idxmax(), "trial_id"]
