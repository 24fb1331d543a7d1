"""FSDP (torch's fully_shard) on 2 CPU ranks (gloo) fine-tunes a GPT-NeoX-shaped model the
way DDP does: the same losses and weights after the same steps, and the sharded model is
saved as an ordinary Hugging Face checkpoint that `from_pretrained` loads."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_ranks import _free_port

TOLERANCE = 1e-4  # relative, on every epoch's loss and on every weight (float reduction order)


def _rank(rank: int, world: int, port: int, strategy: str, out: str, checkpointing: bool):
    from sae_ray.config import Cycles, Dataset
    from sae_ray.distributed import sharding
    from sae_ray.lm.models import build_classifier, save_classifier
    from sae_ray.lm.text_data import load_text_data
    from sae_ray.method.finetune import finetune

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    data = load_text_data(Dataset(num_examples=160), seed=0)
    clf = build_classifier("tiny-neox", 4, data.splits["train"].texts, seed=0, max_length=32)
    cycles = Cycles(epochs=2, batch_size=16, lr=3e-3, warmup_steps=2)
    history = finetune(
        clf,
        data.splits["train"],
        cycles,
        layer=-1,
        max_length=32,
        seed=0,
        val=data.splits["validation"],
        strategy=strategy,
        activation_checkpointing=checkpointing,
    )
    weights = sharding.full_state_dict(clf.model) if sharding.is_sharded(clf.model) else None
    if rank == 0:
        save_classifier(clf, os.path.join(out, "model"), weights)
        with open(os.path.join(out, "history.json"), "w") as f:
            json.dump(history, f)
    dist.destroy_process_group()


def _finetune(root, strategy: str, checkpointing: bool = False) -> tuple[list[dict], dict]:
    from transformers import AutoModelForSequenceClassification

    out = root / strategy
    out.mkdir()
    args = (2, _free_port(), strategy, str(out), checkpointing)
    mp.spawn(_rank, args=args, nprocs=2, join=True)
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    history = json.loads((out / "history.json").read_text())
    return history, dict(model.state_dict())


def test_fsdp_fine_tunes_a_neox_model_as_ddp_does_and_saves_a_loadable_checkpoint(tmp_path):
    ddp_history, ddp = _finetune(tmp_path, "ddp")
    fsdp_history, fsdp = _finetune(tmp_path, "fsdp", checkpointing=True)
    assert [r["steps"] for r in fsdp_history] == [r["steps"] for r in ddp_history] == [8, 16]
    for ours, theirs in zip(fsdp_history, ddp_history, strict=True):
        assert ours["ce"] == pytest.approx(theirs["ce"], rel=TOLERANCE)
        assert ours["val_accuracy"] == theirs["val_accuracy"]
    assert ddp_history[-1]["ce"] < ddp_history[0]["ce"]  # it trained
    config = json.loads((tmp_path / "fsdp" / "model" / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForSequenceClassification"]
    assert fsdp.keys() == ddp.keys()
    for name, value in ddp.items():  # atol: the attention key bias's gradient is 0 up to
        # float noise (softmax ignores it), which Adam's normalisation magnifies to ~1e-5
        torch.testing.assert_close(fsdp[name], value, rtol=TOLERANCE, atol=5e-5, msg=name)
