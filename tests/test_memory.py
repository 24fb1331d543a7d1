"""The memory plan: sized from a model's config alone (no weights, no cluster), printed by
`sae-ray plan`, and refusing before Ray starts what cannot fit."""

from __future__ import annotations

import pytest

from sae_ray import config as config_mod
from sae_ray.cli import main as cli
from sae_ray.cli import preflight
from sae_ray.lm.models import preset_config
from sae_ray.trial.memory import GB, Shape
from tests.conftest import QUICKSTART

NEOX = QUICKSTART.parent / "sst2_neox20b.yaml"
OFFLINE = "dataset.name=synthetic:topics"


def test_the_presets_have_their_published_sizes():
    """GPT-NeoX-20B has 20,554,567,680 parameters with its LM head (the paper's count),
    GPT-2 small 124,439,808: the classifiers lack the LM head and add a small score head."""
    neox = preset_config("gpt-neox-20b")
    shape = Shape.of(neox)
    lm_head, score = neox.vocab_size * neox.hidden_size, 2 * neox.hidden_size
    assert shape.params - score + lm_head == 20_554_567_680
    assert shape.layers == 44 and shape.hidden == 6144
    gpt2 = Shape.of(preset_config("gpt2"))
    assert gpt2.params - 2 * 768 == 124_439_808  # GPT-2 ties its LM head to the embeddings


def test_ddp_fine_tuning_is_weights_gradients_and_adam_on_every_worker():
    cfg = config_mod.load(QUICKSTART, ["model.name=gpt2", "resources.num_workers=2"])
    plan = preflight.memory_plan(cfg, 1200)
    finetune = plan.stages[0]
    params = Shape.of(preset_config("gpt2")).params
    assert finetune.name == "fine-tune"
    # fp32: weights + gradients + two Adam moments = 16 bytes, DDP's buckets 4 more
    assert finetune.parts["weights+grads+adam"] == 16 * params
    assert finetune.parts["ddp buckets"] == 4 * params
    fsdp = preflight.memory_plan(
        cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"strategy": "fsdp"})}),
        1200,
    )
    assert fsdp.stages[0].parts["sharded state"] == 16 * params / 2


def test_plan_passes_the_20b_sweep_on_8_gpus_with_fsdp(capsys):
    assert cli.main(["plan", str(NEOX), OFFLINE]) == 0
    out = capsys.readouterr().out
    assert "memory per worker of 80 GB:" in out and out.strip().endswith("fits")
    for stage in ("fine-tune", "extraction", "SAE fit", "evaluation"):
        assert f"  {stage}" in out, stage


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["resources.strategy=ddp"], "resources.strategy"),
        (["resources.num_workers=1"], "resources.num_workers"),  # fsdp over one GPU: no shards
        (["resources.num_workers=2", "cycles.train_layers=all"], "resources.num_workers"),
        (["cycles.count=1", "cycles.start_from=pretrained", "model.dtype=float32"], "model.dtype"),
    ],
)
def test_plan_refuses_what_cannot_fit_naming_the_field(capsys, overrides, field):
    assert cli.main(["plan", str(NEOX), OFFLINE, *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {field}: the "), err


def test_a_local_config_json_is_enough(tmp_path, capsys):
    """A model folder with only its config.json (no weights) is sized as the hub's would be."""
    from transformers import GPT2Config

    GPT2Config(n_layer=4, n_embd=256, n_head=4).save_pretrained(tmp_path / "m")
    assert cli.main(["plan", str(QUICKSTART), f"model.name={tmp_path / 'm'}"]) == 0
    out = capsys.readouterr().out
    assert "extraction" in out
    cfg = config_mod.load(QUICKSTART, [f"model.name={tmp_path / 'm'}"])
    plan = preflight.memory_plan(cfg, 1200)
    assert 0 < plan.stages[1].parts["model"] < 0.2 * GB
