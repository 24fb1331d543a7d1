"""Bad input, through the command line as a user meets it: every case exits 2 with one line
that names the field or file, and no traceback. Config typos, impossible values, data that
does not fit the task, storage that cannot be written. All are caught before Ray starts."""

from __future__ import annotations

import pytest

from sae_ray.cli import main as cli
from sae_ray.cli.parser import parse
from tests.conftest import QUICKSTART

BASE = "experiment: {name: bad}\n"


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Everything here must be refused before Ray starts: reaching it is a failure."""

    def refuse(*args):
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
    ("target_l0 of a topk", None, ["sae.target_l0=8"], "sae.target_l0: only a jumprelu"),
    (
        "target_l0 fixed while the architecture is searched",
        None,
        [
            "sae.architecture=jumprelu",
            "sae.target_l0=8",
            "search.space={sae.architecture: {type: choice, values: [jumprelu, batchtopk]}}",
            "search.points_to_evaluate=[]",
        ],
        "search.space.sae.architecture: sae.target_l0: only a jumprelu has an L0 penalty, "
        "not batchtopk",
    ),
    ("fixed layer beyond the blocks", None, ["model.layer=5"], "model.layer: 5 is out of range"),
    ("fixed layer before the first", None, ["model.layer=-3"], "model.layer: -3 is out of range"),
    (
        "objective on no metric",
        None,
        ["search.objectives=[{metric: interp/uu}]"],
        "search.objectives.0.metric: 'interp/uu' is not a metric a trial reports; did you mean",
    ),
    (
        "constraint on no metric",
        None,
        ["search.constraints=[{metric: val/acc, min: 0.5}]"],
        "search.constraints.0.metric: 'val/acc' is not a metric",
    ),
    ("search metric unknown", None, ["search.metric=loss"], "search.metric: 'loss' is not a"),
    ("override without =", None, ["sae.k"], "sae.k"),
    ("override unknown key", None, ["nope.x=1"], "nope"),
    ("unknown synthetic task", None, ["dataset.name=synthetic:weather"], "dataset.name"),
    ("name of dots", "experiment: {name: '..'}\n", [], "experiment.name"),
    ("name of one dot", "experiment: {name: '.'}\n", [], "experiment.name"),
    ("infinite lr", BASE + "cycles: {lr: .inf}\n", [], "cycles.lr"),
    ("nan aux weight", BASE + "cycles: {aux_weight: .nan}\n", [], "cycles.aux_weight"),
    ("duplicate key", BASE + "sae:\n  k: 4\n  k: 8\n", [], "duplicate key 'k'"),
    ("duplicate section", BASE + "sae: {k: 4}\nsae: {k: 8}\n", [], "duplicate key 'sae'"),
    (
        "constraint min above max",
        None,
        ["search.constraints=[{metric: val/accuracy, min: 0.9, max: 0.5}]"],
        "search.constraints.0: min 0.9 is above max 0.5",
    ),
    (
        "searching the sweep's name",
        None,
        ["search.space={experiment.name: {type: choice, values: [a, b]}}"],
        "search.space.experiment.name: cannot be searched",
    ),
    (
        "searching the resources",
        None,
        ["search.space={resources.num_workers: {type: choice, values: [1, 2]}}"],
        "search.space.resources.num_workers: cannot be searched",
    ),
    (
        "when never sampled",
        None,
        [
            "search.space={sharpening.strategy: {type: choice, values: [per_class, none]}, "
            "sharpening.keep_frac: {type: choice, values: [0.25, 0.5], "
            "when: {sharpening.strategy: per_exampel}}}",
            "search.points_to_evaluate=[]",
        ],
        "search.space.sharpening.keep_frac.when: sharpening.strategy='per_exampel' is never",
    ),
    (
        "missing dataset file",
        None,
        ["dataset.name=./no/such.csv"],
        "dataset.name: ./no/such.csv: no such file",
    ),
    ("negative seed", None, ["experiment.seed=-1"], "experiment.seed: must be at least 0"),
    ("negative split seed", None, ["dataset.split_seed=-2"], "dataset.split_seed: must be"),
    ("override value not YAML", None, ["sae.k=[1,"], "sae.k=[1,: the value is not valid YAML"),
    ("override without a key", None, ["=5"], "=5: an override needs a key"),
    ("override with an empty part", None, ["sae..k=5"], "sae..k=5: an override needs a key"),
    ("no model", None, ["model.name=not a model!"], "model.name: 'not a model!' is neither"),
    ("no model, slashes", None, ["model.name=a/b/c"], "model.name: 'a/b/c' is neither"),
    ("a step smaller than the workers", None, ["cycles.batch_size=1"], "cycles.batch_size: 1"),
    (
        "longer than the model's positions",
        None,
        ["model.name=gpt2", "model.max_length=2048"],
        "model.max_length: 2048 tokens is more than gpt2's 1024 positions",
    ),
    (
        "primary contrast on an unpaired metric",
        None,
        ["analysis.primary={strategy: per_class, metric: sae/l0}"],
        "analysis.primary.metric: 'sae/l0' has no paired difference",
    ),
    (
        "primary contrast past the last cycle",
        None,
        ["analysis.primary={strategy: per_class, metric: interp/u, cycle: 2}"],
        "analysis.primary.cycle: 2 is past the last cycle (1)",
    ),
    (
        "a contrast of a strategy with itself",
        None,
        ["analysis.contrasts=[{strategy: centroid, against: centroid}]"],
        "analysis.contrasts.0.against: centroid against itself",
    ),
]


@pytest.mark.parametrize("name, text, overrides, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_sweep_exits_2_with_one_line(
    tmp_path, capsys, monkeypatch, name, text, overrides, expected
):
    monkeypatch.chdir(tmp_path)  # a YAML's default ./runs lands here
    path = _yaml(tmp_path, text) if text else str(QUICKSTART)
    storage = [f"experiment.storage_path={tmp_path / 'runs'}"] if text is None else []
    assert cli.main(["sweep", path, *storage, *overrides]) == 2
    _one_line(capsys, expected)
    assert not (tmp_path / "runs").exists()  # a refused sweep leaves nothing behind


def _one_line(capsys, expected: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def test_missing_sweep_file(tmp_path, capsys):
    assert cli.main(["sweep", str(tmp_path / "nope.yaml")]) == 2
    _one_line(capsys, "nope.yaml: no such sweep file")


def test_yaml_that_does_not_parse(tmp_path, capsys):
    assert cli.main(["run", _yaml(tmp_path, "experiment: {name: [unclosed\n")]) == 2
    _one_line(capsys, "not valid YAML")


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"\xff\xfe\x00\x01 not text", "not UTF-8 text"),
        (b"experiment: {name: x}\n\x00\x00", "binary data"),
        (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
    ],
    ids=["not utf-8", "binary", "deep nesting"],
)
def test_a_sweep_file_that_is_not_yaml(tmp_path, capsys, content, expected):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(content)
    assert cli.main(["sweep", str(path)]) == 2
    _one_line(capsys, f"{path}: {expected}")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train-sae", "m", "d", "--loss_fn", "bogus"], "--loss_fn: invalid choice: 'bogus'"),
        (["train-sae", "m", "d", "--k", "many"], "--k: invalid int value: 'many'"),
        (["sweep"], "sweep_file: required"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["run", "x.yaml", "--nope"], "unrecognized arguments: --nope"),
    ],
)
def test_command_line_mistakes_are_one_line(capsys, args, expected):
    assert cli.main(args) == 2
    _one_line(capsys, expected)


def test_version_and_help_list_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip().startswith("sae-ray 0.")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    commands = out.split("positional arguments:")[1]
    for command in ("sweep", "run", "report", "train-sae"):
        assert f"\n    {command} " in commands, command


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


def _rows(n: int = 60, label=lambda i: i % 3, text=lambda i: f"words about topic {i % 3} {i}"):
    return [f'"{text(i)}",{label(i)}' for i in range(n)]


DATASETS = {
    "empty text": (_rows(text=lambda i: "" if i == 7 else f"topic {i % 3} {i}"), "1 empty text"),
    "blank label": (_rows(label=lambda i: "" if i == 5 else i % 3), "without a label"),
    "fractional label": (_rows(label=lambda i: 0.5 if i == 3 else i % 2), "label 0.5 is not"),
    "sparse label ids": (_rows(label=lambda i: 999999 if i % 2 else 0), "ids run to 999999"),
    "too few rows": (_rows(n=4), "too few to carve"),
}


@pytest.mark.parametrize("name", DATASETS)
def test_degenerate_datasets_are_refused(tmp_path, capsys, name):
    rows, expected = DATASETS[name]
    data = _csv(tmp_path, "text,label", rows)
    args = ["sweep", str(QUICKSTART), f"dataset.name={data}", f"experiment.storage_path={tmp_path}"]
    assert cli.main(args) == 2
    _one_line(capsys, expected)


def _damaged(path, kind):
    rows = [f'"words about topic {i % 3} number {i}",{i % 3}' for i in range(60)]
    if kind == "empty":
        path.write_text("")
    elif kind == "header only":
        path.write_text("text,label\n")
    elif kind == "latin-1":
        lines = [f'"café {i}",{i % 3}' for i in range(60)]
        path.write_bytes(("text,label\n" + "\n".join(lines) + "\n").encode("latin-1"))
    elif kind == "extra fields":
        path.write_text("text,label\n" + "\n".join([*rows[:9], '"x",1,2,3', *rows[9:]]) + "\n")
    elif kind == "truncated line":
        lines = [f'{{"text": "words {i}", "label": {i % 3}}}' for i in range(60)]
        path.write_text("\n".join([*lines[:30], '{"text": "half a li', *lines[30:]]) + "\n")
    else:  # text named .parquet
        path.write_text("text,label\n" + "\n".join(rows) + "\n")


DAMAGED = [  # (kind, file name, what the line says)
    ("empty", "data.csv", "data.csv is empty"),
    ("header only", "data.csv", "data.csv: has no data rows"),
    ("latin-1", "data.csv", "data.csv: not UTF-8 text (byte 0xe9 at offset 15, line 2)"),
    ("extra fields", "data.csv", "data.csv: cannot be read as CSV (Error tokenizing data. C "),
    ("truncated line", "data.jsonl", "data.jsonl: cannot be read as JSON lines (JSON parse "),
    ("text named .parquet", "data.parquet", "data.parquet: is not a Parquet file"),
]


@pytest.mark.parametrize("kind, name, expected", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_a_damaged_data_file_is_one_line_naming_it(tmp_path, capsys, kind, name, expected):
    _damaged(tmp_path / name, kind)
    args = ["sweep", str(QUICKSTART), f"dataset.name={tmp_path / name}"]
    assert cli.main([*args, f"experiment.storage_path={tmp_path / 'runs'}"]) == 2
    line = _one_line(capsys, f"dataset.name: {tmp_path}/")
    assert expected in line


def test_integral_float_labels_are_classes(tmp_path):
    """pandas reads an integer column with a gap as floats: 1.0 is class 1, not a new class."""
    from sae_ray.config import Dataset
    from sae_ray.lm.text_data import load_text_data

    data = _csv(tmp_path, "text,label", _rows(label=lambda i: float(i % 3)))
    loaded = load_text_data(Dataset(name=data), seed=0)
    assert loaded.num_classes == 3 and loaded.label_names == ["0", "1", "2"]


def test_storage_path_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert cli.main(["sweep", str(QUICKSTART), f"experiment.storage_path={blocker}"]) == 2
    _one_line(capsys, f"experiment.storage_path: {blocker}/quickstart is not writable")


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    runs = tmp_path / "runs"
    args = ["sweep", str(QUICKSTART), f"experiment.storage_path={runs}", "--resume"]
    assert cli.main(args) == 2
    _one_line(capsys, "--resume: no sweep to resume at")
    assert not runs.exists()  # preflight's write probe made it, and took it away again


def test_report_of_no_sweep(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    _one_line(capsys, "results.csv: not found")


def test_export_saelens_refuses_what_it_cannot_export(tmp_path, capsys):
    """No folder, a folder with no SAE, an output inside the run: one line, nothing written."""
    from sae_ray.sae.model import SaeConfig, SparseAutoencoder

    (tmp_path / "empty").mkdir()
    SparseAutoencoder(SaeConfig(8, 16, 2)).save(tmp_path / "run" / "h.0")
    for source, out, message in (
        ("nope", "x", "nope: no such directory"),
        ("empty", "x", "empty: no SAE checkpoint (sae.safetensors) under it"),
        ("run", "run/saelens", "run/saelens: inside"),
    ):
        args = ["export-saelens", str(tmp_path / source), str(tmp_path / out)]
        assert cli.main(args) == 2
        _one_line(capsys, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "run"]
    assert not (tmp_path / "run" / "saelens").exists()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--k", "0"], "--k: must be at least 1"),
        (["--max_tokens", "0"], "--max_tokens"),
        (["--batch_size", "-1"], "--batch_size"),
        (["--layer_stride", "0"], "--layer_stride: must be at least 1"),
        (["--expansion_factor", "0"], "--expansion_factor: must be at least 1"),
        (["--dead_window_tokens", "0"], "--dead_window_tokens: must be at least 1"),
        (["--layers", "7"], "--layers"),
        (["--num_latents", "4", "--k", "8"], "--k: 8 is larger than the 4 latents"),
        (["--target_l0", "4"], "--target_l0: only a jumprelu has an L0 penalty, not topk"),
        (
            ["--architecture", "jumprelu", "--num_latents", "64", "--k", "4", "--target_l0", "65"],
            "--target_l0: 65 is more than the 64 latents",
        ),
    ],
)
def test_train_sae_flags(tmp_path, capsys, flags, expected):
    args = ["train-sae", "tiny-gpt2", "synthetic:topics", "--save_dir", str(tmp_path), *flags]
    assert cli.main(args) == 2
    _one_line(capsys, expected)


def test_train_sae_refuses_before_ray_a_model_it_cannot_load(tmp_path, capsys):
    not_a_model = tmp_path / "folder"
    not_a_model.mkdir()
    args = ["train-sae", str(not_a_model), "synthetic:topics", "--save_dir", str(tmp_path)]
    assert cli.main(args) == 2
    _one_line(capsys, "model: cannot load")


def test_train_sae_refuses_before_ray_a_missing_dataset_or_unwritable_save_dir(tmp_path, capsys):
    args = ["train-sae", "tiny-gpt2", "./no/such.csv", "--save_dir", str(tmp_path)]
    assert cli.main(args) == 2
    _one_line(capsys, "dataset.name: ./no/such.csv: no such file")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = ["train-sae", "tiny-gpt2", "synthetic:topics", "--save_dir", str(blocker)]
    assert cli.main(args) == 2
    _one_line(capsys, "--save_dir:")


def test_a_model_folder_that_holds_no_model(tmp_path, capsys):
    empty = tmp_path / "my-model"
    empty.mkdir()
    runs = f"experiment.storage_path={tmp_path / 'runs'}"
    for override, expected in (
        (f"model.name={empty}", f"model.name: {empty} holds no model"),
        ("model.name=./no/such/model", "model.name: ./no/such/model: no such model folder"),
        (f"cycles.start_from={empty}", f"cycles.start_from: {empty} holds no saved classifier"),
    ):
        assert cli.main(["sweep", str(QUICKSTART), runs, override]) == 2
        _one_line(capsys, expected)


TRIPWIRE_CASES = [
    (["sweep", "{yaml}"], BASE + "sae: {kk: 3}\n", "sae.kk: unknown key"),
    (
        ["sweep", "{quickstart}", "model.layer=7", "experiment.storage_path={tmp}"],
        None,
        "model.layer",
    ),
    (["run", "{yaml}", "sae.k=0"], BASE, "sae.k"),
    (["sweep", "{quickstart}", "--resume", "experiment.storage_path={tmp}"], None, "--resume"),
    (
        ["train-sae", "tiny-gpt2", "synthetic:topics", "--expansion_factor", "1", "--k", "999"],
        None,
        "--k",
    ),
    (["report", "{tmp}/nowhere"], None, "nowhere"),
    (  # the 20B model's fine-tunes with a replica per GPU: the memory plan refuses them
        ["sweep", "{neox}", "dataset.name=synthetic:topics", "resources.strategy=ddp"],
        None,
        "resources.strategy: the fine-tune needs",
    ),
]


@pytest.mark.parametrize(
    "args, text, expected",
    TRIPWIRE_CASES,
    ids=[" ".join(c[0][:1] + [c[2]]) for c in TRIPWIRE_CASES],
)
def test_bad_input_never_reaches_a_ray_cluster(tmp_path, args, text, expected):
    """As a user runs it, in its own process: `RAY_ADDRESS` names a cluster that is not there
    (a tripwire: joining it would fail loudly, or hang), and each refusal is still exit 2,
    one line, before any attempt to join."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    if text is not None:
        (tmp_path / "sweep.yaml").write_text(text)
    neox = QUICKSTART.parent / "sst2_neox20b.yaml"
    where = {
        "yaml": tmp_path / "sweep.yaml",
        "tmp": tmp_path,
        "quickstart": QUICKSTART,
        "neox": neox,
    }
    argv = [a.format(**where) for a in args]
    if argv[0] == "train-sae":
        argv += ["--save_dir", str(tmp_path / "out")]
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "sae_ray", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert "Traceback" not in done.stderr and not done.stdout.strip()


def test_overrides_may_follow_a_flag():
    """`sae-ray sweep FILE --resume sae.k=16` is what people type; argparse alone refused it
    ('unrecognized arguments') once the file had been read as the positional."""
    args = parse(["sweep", "s.yaml", "sae.k=4", "--resume", "sae.k=16", "--verbose"])
    assert args.overrides == ["sae.k=4", "sae.k=16"] and args.resume and args.verbose
    with pytest.raises(Exception, match="unrecognized arguments: --nope"):
        parse(["sweep", "s.yaml", "--resume", "sae.k=16", "--nope"])


def test_selection_never_reads_the_test_split_and_sharpening_must_sharpen(tmp_path, capsys):
    runs = f"experiment.storage_path={tmp_path / 'runs'}"
    for override, expected in (
        ("search.metric=test/accuracy", "search.metric: 'test/accuracy' is measured on the held"),
        (
            "search.constraints=[{metric: test/interp/u, min: 0}]",
            "select on 'interp/u'",
        ),
        (  # with nothing searched that sets the count, the whole sweep would sharpen nothing
            "search.space={sae.lr: {type: choice, values: [0.003]}}",
            "sharpening.keep_frac: keeps 8 latents of k=8",
        ),
    ):
        extra = ["search.points_to_evaluate=[]", "sharpening.strategy=per_example"]
        extra += ["sharpening.keep_frac=1"]
        args = ["sweep", str(QUICKSTART), runs, override, *(extra if "space" in override else [])]
        assert cli.main(args) == 2
        _one_line(capsys, expected)
    assert not (tmp_path / "runs").exists()


def test_an_unreachable_hub_answers_at_once(tmp_path):
    """No network or a firewall: the hub's loaders retry every file five times (20+ s of
    warnings). A plan answers within seconds with its note; a sweep in one line, exit 2."""
    import os
    import socket
    import subprocess
    import sys
    import time

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: every connection is refused at once
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0"}
    sweep = str(QUICKSTART.parent / "sst2_gpt2.yaml")
    for command, code in (("plan", 0), ("sweep", 2)):
        started = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sae_ray",
                command,
                sweep,
                f"experiment.storage_path={tmp_path}",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        took = time.perf_counter() - started
        assert done.returncode == code, done.stdout + done.stderr
        assert took < 20, took
        assert "Retrying" not in done.stderr and "Traceback" not in done.stderr
        said = (done.stdout if command == "plan" else done.stderr).strip().splitlines()
        reason = "cannot reach the Hugging Face hub"
        if command == "sweep":
            assert (
                len(said) == 1 and said[0].startswith("error: dataset.name: ") and reason in said[0]
            )
        else:
            assert reason in said[0] and "HF_HUB_OFFLINE=1" in said[0] and said[-1] == "fits"
