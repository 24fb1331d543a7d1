"""Hookpoints by module name (`--hookpoints`): sparsify's glob patterns over the base
model's modules, each module's output or (`:input`) its input, captured in one pass and
stored as a column each with its own width; a pattern that matches nothing is named."""

from __future__ import annotations

import pytest
import torch

from sae_ray.lm.extraction import extract, load_tokens, read_manifest
from sae_ray.lm.hookpoints import hooked_points, matching, widths
from sae_ray.lm.models import build_classifier
from sae_ray.lm.text_data import load_text_data


@pytest.fixture(scope="module")
def gpt2():
    from sae_ray.config import Dataset

    data = load_text_data(Dataset(name="synthetic:topics"), seed=0)
    clf = build_classifier("tiny-gpt2", 2, data.splits["train"].texts, seed=0, max_length=32)
    return clf, data.splits["train"]


def test_patterns_match_modules_in_natural_order(gpt2):
    model = gpt2[0].model
    assert matching(model, ["h.*.mlp"]) == ["h.0.mlp", "h.1.mlp"]
    assert matching(model, ["h.1.attn:input", "h.?"]) == ["h.0", "h.1", "h.1.attn:input"]
    with pytest.raises(ValueError, match=r"'layers\.\*\.mlp' matches no module.*h\.0\.attn"):
        matching(model, ["layers.*.mlp"])


def test_a_modules_input_and_output_are_what_it_reads_and_writes(gpt2):
    clf, _ = gpt2
    ids = torch.randint(2, 50, (3, 7))
    points = ["h.0", "h.0.mlp:input", "h.0.mlp", "h.1.mlp.c_fc"]
    with torch.no_grad(), hooked_points(clf.model, points) as got:
        out = clf.model.transformer(input_ids=ids, output_hidden_states=True)
        mlp = clf.model.transformer.h[0].mlp
        torch.testing.assert_close(mlp(got["h.0.mlp:input"]), got["h.0.mlp"])
    torch.testing.assert_close(got["h.0"], out.hidden_states[1])
    assert got["h.1.mlp.c_fc"].shape == (3, 7, 4 * 64)  # the MLP's inner width
    assert widths(clf.model, points) == {"h.0": 64, "h.0.mlp:input": 64, "h.0.mlp": 64,
                                         "h.1.mlp.c_fc": 256}  # fmt: skip
    with pytest.raises(ValueError, match="'h': no forward pass runs this module"):
        widths(clf.model, ["h"])  # the block list: never called


def test_extraction_stores_each_hookpoint_with_its_width(gpt2, tmp_path):
    clf, split = gpt2
    points = ["h.0.mlp:input", "h.0.mlp", "h.1.mlp.c_fc"]
    extract(clf, split, points, tmp_path, max_length=32, max_tokens=500)
    manifest = read_manifest(tmp_path / "tokens")
    assert manifest.columns == points and manifest.rows == 500
    assert [manifest.width(c) for c in points] == [64, 64, 256]
    x, y = (torch.from_numpy(load_tokens(tmp_path / "tokens", c)) for c in points[:2])
    with torch.no_grad():
        torch.testing.assert_close(clf.model.transformer.h[0].mlp(x), y, rtol=1e-4, atol=1e-5)
    assert load_tokens(tmp_path / "tokens", "h.1.mlp.c_fc").shape == (500, 256)


def test_train_sae_help_lists_every_recipe_flag_with_its_default():
    import re

    from sae_ray.cli.parser import parser

    sub = parser()._subparsers._group_actions[0].choices["train-sae"]
    entries = re.split(r"\n  (?=--)", sub.format_help().split("\noptions:", 1)[1])
    helps = {e.split()[0]: re.sub(r"\s+", " ", e) for e in entries if e.startswith("--")}
    expected = {
        "--lr_warmup_steps": "0", "--lr_decay": "constant", "--lr_end_factor": "0.0",
        "--l0_warmup_steps": "0",
        "--normalize_activations": "False", "--exclude_tokens": r"\[\]",
        "--exclude_special_tokens": "False", "--init_seeds": r"\[42\]",
        "--k_anneal_from": "None", "--k_anneal_steps": "0", "--hookpoints": "None",
        "--transcode": "False", "--skip_connection": "False",
    }  # fmt: skip
    for flag, default in expected.items():
        assert re.search(rf"\(default: {default}\)$", helps[flag].strip()), helps[flag]
