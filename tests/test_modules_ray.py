"""docs/train-sae.md's module and transcoder commands, run as typed on the test cluster:
SAEs on glob-matched modules (outputs and inputs), skip transcoders on the MLPs that
predict each MLP's output from its input, and their SAELens export, which agrees."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parents[1] / "docs" / "train-sae.md"


def _commands() -> list[list[str]]:
    """The `sae-ray` commands of the docs' block under "Any module, and transcoders"."""
    text = DOCS.read_text().split("**Any module, and transcoders.**", 1)[1]
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip()]


def test_the_docs_module_and_transcoder_commands_run_as_typed(ray_cluster, tmp_path, monkeypatch):
    from sae_lens import SAE

    from sae_ray.cli import main as cli
    from sae_ray.config import Dataset
    from sae_ray.lm.hookpoints import hooked_points
    from sae_ray.lm.models import build_classifier
    from sae_ray.lm.text_data import load_text_data
    from sae_ray.sae.model import SparseAutoencoder

    monkeypatch.chdir(tmp_path)
    commands = _commands()
    assert [c[:2] for c in commands] == [["sae-ray", "train-sae"]] * 2 + [
        ["sae-ray", "export-saelens"]
    ]
    for command in commands:
        assert cli.main(command[1:]) == 0, command

    modules = tmp_path / "output" / "modules"
    saved = sorted(p.name for p in modules.iterdir() if (p / "sae.safetensors").is_file())
    assert saved == ["h.0.attn:input", "h.0.mlp", "h.1.attn:input", "h.1.mlp"]
    last = json.loads((modules / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(0 < last[f"fvu/{hp}"] < 1 for hp in saved)

    run = tmp_path / "output" / "mlp-transcoders"
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    tc = SparseAutoencoder.load(run / "h.1.mlp")
    assert tc.cfg.transcode and tc.cfg.skip_connection and tc.W_skip.abs().sum() > 0
    assert 0 < last["fvu/h.1.mlp"] < 1

    # the MLP's input -> its output, on the model the run extracted from (the same seed)
    data = load_text_data(Dataset(name="synthetic:topics"), 42, need_labels=False)
    labels = max(2, data.num_classes)
    clf = build_classifier("tiny-gpt2", labels, data.splits["train"].texts, 42, 32)
    batch = clf.tokenizer(data.splits["validation"].texts[:8], return_tensors="pt", padding=True)
    with torch.no_grad(), hooked_points(clf.model, ["h.1.mlp:input", "h.1.mlp"]) as got:
        clf.model.transformer(**batch)
    real = batch["attention_mask"].bool()
    x, y = got["h.1.mlp:input"][real], got["h.1.mlp"][real]
    theirs = SAE.load_from_disk(str(tmp_path / "saelens" / "h.1.mlp"))
    assert theirs.cfg.architecture() == "jumprelu_skip_transcoder"
    with torch.no_grad():
        ours = tc(x)[0]
        torch.testing.assert_close(theirs(x), ours, rtol=1e-4, atol=1e-4)
        fvu = float((y - ours).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert fvu < 0.5, fvu  # it predicts the MLP's output from its input
