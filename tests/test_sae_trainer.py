"""The SAE trainer's pieces without Ray: dead-latent window, checkpoints."""

import json

import torch

from sae_ray.sae.checkpoints import Progress, load_checkpoint, publish, save_checkpoint
from sae_ray.sae.model import SaeConfig, SparseAutoencoder
from sae_ray.sae.training import DeadTracker, make_optimizer, train_step


def _fire(tracker, latents, n_tokens):
    idx = torch.tensor(latents).view(-1, 1)
    tracker.update(idx, torch.ones_like(idx, dtype=torch.float), n_tokens)


def test_nothing_is_dead_before_a_full_window():
    tracker = DeadTracker(torch.zeros(4, dtype=torch.long), window=100)
    _fire(tracker, [0], 99)
    assert not tracker.dead().any()
    _fire(tracker, [1], 1)  # the window closes: 2 and 3 never fired
    assert tracker.dead().tolist() == [False, False, True, True]


def test_dead_threshold_is_a_fraction_of_the_window_tokens():
    tracker = DeadTracker(torch.zeros(3, dtype=torch.long), window=1000, threshold=0.01)
    # latent 0 fires on 20 of 1000 tokens (2%), latent 1 on 5 (0.5%), latent 2 never
    _fire(tracker, [0] * 20 + [1] * 5, 1000)
    assert tracker.dead().tolist() == [False, True, True]


def _setup(seed=0):
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(16, 64, 4))
    opt = make_optimizer("adam", sae.parameters(), lr=1e-3)
    tracker = DeadTracker(torch.zeros(64, dtype=torch.long), window=200)
    return sae, opt, tracker


def test_checkpoint_resumes_exactly_optimizer_and_dead_state_included(tmp_path):
    torch.manual_seed(1)
    batches = [torch.randn(64, 16) * 3 for _ in range(6)]
    sae, opt, tracker = _setup()
    sae.init_b_dec(batches[0])
    for x in batches[:3]:
        train_step(sae, sae, opt, x, tracker, 0.5)
    save_checkpoint(tmp_path / "ckpt", {"h.0": sae}, {"h.0": opt}, {"h.0": tracker}, Progress(3))
    for x in batches[3:]:
        train_step(sae, sae, opt, x, tracker, 0.5)

    again, opt2, tracker2 = _setup(seed=99)  # different init: everything must come from disk
    progress = load_checkpoint(tmp_path / "ckpt", {"h.0": again}, {"h.0": opt2}, {"h.0": tracker2})
    assert progress.step == 3
    for x in batches[3:]:
        train_step(again, again, opt2, x, tracker2, 0.5)
    for name, value in sae.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value, msg=name)
    torch.testing.assert_close(tracker2.fires, tracker.fires)
    # sparsify's layout, and nothing pickled
    files = sorted(p.name for p in (tmp_path / "ckpt" / "h.0").iterdir())
    assert "sae.safetensors" in files and "cfg.json" in files
    assert not list((tmp_path / "ckpt").rglob("*.pt"))


def test_publish_replaces_the_checkpoint_and_keeps_the_log(tmp_path):
    dest = tmp_path / "run"
    (dest / "h.0").mkdir(parents=True)
    (dest / "h.0" / "sae.safetensors").write_text("old")
    (dest / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    src = tmp_path / "new"
    (src / "h.0").mkdir(parents=True)
    (src / "h.0" / "sae.safetensors").write_text("new")
    publish(src, dest)
    assert (dest / "h.0" / "sae.safetensors").read_text() == "new"
    assert (dest / "metrics.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "run"]  # no temp left
