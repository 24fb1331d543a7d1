"""Bad input, through the command line as a user meets it: every case exits 2 with one line
that names the field or file, and no traceback. Config typos, impossible values, data that
does not fit the task, storage that cannot be written. All are caught before Ray starts."""

from __future__ import annotations

import pytest

from sae_ray.cli import main as cli
from tests.conftest import QUICKSTART

BASE = "experiment: {name: bad}\n"


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Everything here must be refused before Ray starts: reaching it is a failure."""

    def refuse(address):
        raise AssertionError("bad input reached Ray")

    monkeypatch.setattr(cli, "_connect", refuse)


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return str(path)


def _csv(tmp_path, header: str, rows: list[str]) -> str:
    path = tmp_path / "data.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def _topics_csv(tmp_path, label: str = "{i}") -> str:
    rows = [f'"words about topic {i % 3} number {i}",{label.format(i=i % 3)}' for i in range(60)]
    return _csv(tmp_path, "text,label", rows)


# (name, yaml text or None for the quickstart, overrides, what the one line must say)
CASES = [
    ("unknown key", BASE + "sae: {kk: 3}\n", [], "sae.kk: unknown key"),
    ("unknown section", BASE + "optimiser: {}\n", [], "optimiser: unknown key"),
    ("wrong type", BASE + "sae: {k: many}\n", [], "sae.k"),
    ("k zero", BASE + "sae: {k: 0}\n", [], "sae.k"),
    ("no cycles", BASE + "cycles: {count: 0}\n", [], "cycles.count"),
    ("negative lr", BASE + "cycles: {lr: -1}\n", [], "cycles.lr"),
    ("no workers", BASE + "resources: {num_workers: 0}\n", [], "resources.num_workers"),
    ("unknown strategy", BASE + "sharpening: {strategy: blur}\n", [], "sharpening.strategy"),
    ("unknown algorithm", None, ["search.algorithm=hyperband"], "search.algorithm"),
    ("unknown scheduler", None, ["search.scheduler=pbt"], "search.scheduler"),
    ("missing experiment", "model: {name: tiny-gpt2}\n", [], "experiment: Field required"),
    ("bad name", "experiment: {name: 'a/b'}\n", [], "experiment.name"),
    (
        "bad storage scheme",
        None,
        ["experiment.storage_path=ftp://host/x"],
        "experiment.storage_path",
    ),
    ("empty space", BASE + "search: {space: {}}\n", [], "search.space"),
    (
        "space key unknown",
        None,
        ["search.space={sae.nope: {type: choice, values: [1]}}"],
        "search.space.sae.nope",
    ),
    (
        "space type unknown",
        None,
        ["search.space={sae.k: {type: normal, low: 1, high: 2}}"],
        "search.space.sae.k",
    ),
    (
        "empty choice",
        None,
        ["search.space={sae.k: {type: choice, values: []}}"],
        "search.space.sae.k",
    ),
    (
        "low above high",
        None,
        ["search.space={sae.k: {type: int, low: 9, high: 2}}"],
        "search.space.sae.k",
    ),
    (
        "point outside space",
        None,
        ["search.points_to_evaluate=[{sae.k: 5}]"],
        "search.points_to_evaluate",
    ),
    (
        "duplicate objective",
        None,
        ["search.objectives=[{metric: interp/u, mode: max}, {metric: interp/u, mode: max}]"],
        "search.objectives",
    ),
    (
        "constraint without bound",
        None,
        ["search.constraints=[{metric: test/accuracy}]"],
        "search.constraints",
    ),
    (
        "k above latents",
        None,
        [
            "sae.k=200",
            "sae.expansion_factor=2",
            "search.space={sharpening.strategy: {type: choice, values: [none]}}",
            "search.points_to_evaluate=[]",
        ],
        "sae.k: k up to 200 is larger than the 128 latents",
    ),
    (
        "searched k above latents",
        None,
        [
            "search.space={sae.k: {type: choice, values: [8, 300]}, "
            "sae.expansion_factor: {type: choice, values: [2, 4]}}",
            "search.points_to_evaluate=[]",
        ],
        "search.space.sae.k: k up to 300",
    ),
    ("override without =", None, ["sae.k"], "sae.k"),
    ("override unknown key", None, ["nope.x=1"], "nope"),
    ("unknown synthetic task", None, ["dataset.name=synthetic:weather"], "dataset.name"),
    (
        "missing dataset file",
        None,
        ["dataset.name=./no/such.csv"],
        "dataset.name: ./no/such.csv: no such file",
    ),
]


@pytest.mark.parametrize("name, text, overrides, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_sweep_exits_2_with_one_line(tmp_path, capsys, name, text, overrides, expected):
    path = _yaml(tmp_path, text) if text else str(QUICKSTART)
    storage = [f"experiment.storage_path={tmp_path / 'runs'}"] if text is None else []
    assert cli.main(["sweep", path, *storage, *overrides]) == 2
    _one_line(capsys, expected)


def _one_line(capsys, expected: str) -> None:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in err


def test_missing_sweep_file(tmp_path, capsys):
    assert cli.main(["sweep", str(tmp_path / "nope.yaml")]) == 2
    _one_line(capsys, "nope.yaml: no such sweep file")


def test_yaml_that_does_not_parse(tmp_path, capsys):
    assert cli.main(["run", _yaml(tmp_path, "experiment: {name: [unclosed\n")]) == 2
    _one_line(capsys, "not valid YAML")


def test_yaml_that_is_a_list(tmp_path, capsys):
    assert cli.main(["run", _yaml(tmp_path, "- a\n- b\n")]) == 2
    _one_line(capsys, "the top level must be a mapping")


def test_dataset_missing_its_text_column(tmp_path, capsys):
    data = _csv(tmp_path, "body,label", [f"x{i},{i % 2}" for i in range(40)])
    args = ["sweep", str(QUICKSTART), f"dataset.name={data}", f"experiment.storage_path={tmp_path}"]
    assert cli.main(args) == 2
    _one_line(capsys, "dataset.text_column: 'text' not in")


def test_dataset_missing_its_label_column(tmp_path, capsys):
    data = _csv(tmp_path, "text,y", [f"x{i},{i % 2}" for i in range(40)])
    args = ["run", str(QUICKSTART), f"dataset.name={data}", f"experiment.storage_path={tmp_path}"]
    assert cli.main(args) == 2
    _one_line(capsys, "dataset.label_column: 'label' not in")


def test_labels_out_of_range(tmp_path, capsys):
    data = _topics_csv(tmp_path, label="{i}")
    (tmp_path / "data.csv").write_text(
        (tmp_path / "data.csv").read_text().replace(",0\n", ",-1\n", 3)
    )
    args = ["sweep", str(QUICKSTART), f"dataset.name={data}", f"experiment.storage_path={tmp_path}"]
    assert cli.main(args) == 2
    _one_line(capsys, "dataset.label_column: label -1 is negative")


def test_a_single_class_dataset(tmp_path, capsys):
    data = _topics_csv(tmp_path, label="1")
    args = ["sweep", str(QUICKSTART), f"dataset.name={data}", f"experiment.storage_path={tmp_path}"]
    assert cli.main(args) == 2
    _one_line(capsys, "fewer than two classes")


def test_storage_path_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert cli.main(["sweep", str(QUICKSTART), f"experiment.storage_path={blocker}"]) == 2
    _one_line(capsys, f"experiment.storage_path: {blocker}/quickstart is not writable")


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    args = ["sweep", str(QUICKSTART), f"experiment.storage_path={tmp_path}", "--resume"]
    assert cli.main(args) == 2
    _one_line(capsys, "--resume: no sweep to resume at")


def test_report_of_no_sweep(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    _one_line(capsys, "results.csv: not found")


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--k", "0"], "--k: must be at least 1"),
        (["--max_tokens", "0"], "--max_tokens"),
        (["--batch_size", "-1"], "--batch_size"),
    ],
)
def test_train_sae_flags(tmp_path, capsys, flags, expected):
    args = ["train-sae", "tiny-gpt2", "synthetic:topics", "--save_dir", str(tmp_path), *flags]
    assert cli.main(args) == 2
    _one_line(capsys, expected)
