"""End-to-end SAE losses without Ray: the SAE spliced into a frozen tiny LM's forward."""

import torch

from sae_ray.lm.models import build_tiny_lm, hookpoint
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.model import SaeConfig, SparseAutoencoder
from sae_ray.sae.spliced import ModelFeed, head_kind, save_for_workers, token_table
from sae_ray.sae.training import DeadTracker, make_optimizer, optimizer_step


def _pretrain(lm, texts, steps=150):
    """A few hundred tokens' worth of language modelling, so the LM has something to lose."""
    opt = torch.optim.AdamW(lm.model.parameters(), lr=3e-3)
    enc = lm.tokenizer(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    lm.model.train()
    for step in range(steps):
        i = (step * 32) % len(texts)
        out = lm.model(
            input_ids=enc["input_ids"][i : i + 32],
            attention_mask=enc["attention_mask"][i : i + 32],
            labels=labels[i : i + 32],
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    lm.model.eval()


def _feed(tmp_path, topics, loss_fn):
    lm = build_tiny_lm("tiny-gpt2", topics.splits["train"].texts, seed=0, max_length=24)
    _pretrain(lm, topics.splits["train"].texts)
    save_for_workers(lm.model, lm.tokenizer, tmp_path / "lm")
    assert head_kind(str(tmp_path / "lm")) == "lm"
    hp = hookpoint(lm.model, 0)
    cfg = SaeTrainConfig(hookpoints=[hp], d_in=64, k=8, expansion_factor=4, loss_fn=loss_fn)
    spec = {"model": str(tmp_path / "lm"), "kind": "lm", "layers": {hp: 0}, "ctx_len": 24}
    feed = ModelFeed(cfg, spec, world=1, device=torch.device("cpu"))
    table, n_tokens = token_table(lm.tokenizer, topics.splits["train"], 24)
    rows = table.to_pydict()
    batches = [
        {
            name: torch.tensor(rows[name][i : i + 32])
            for name in ("input_ids", "attention_mask", "label")
        }
        for i in range(0, len(rows["label"]), 32)
    ]
    assert n_tokens == int(sum(b["attention_mask"].sum() for b in batches))
    return feed, cfg, hp, batches


def _train(feed, cfg, hp, batches, steps):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(64, 256, 8))
    feed.init_b_dec({hp: sae}, batches[0])
    opt = make_optimizer("adam", sae.parameters(), lr=3e-3)
    tracker = DeadTracker(torch.zeros(256, dtype=torch.long), window=10**9)
    losses = []
    for step in range(steps):
        loss, stats = feed.losses({hp: sae}, {hp: sae}, batches[step % len(batches)], {hp: tracker})
        loss.backward()
        optimizer_step(sae, opt)
        losses.append(stats[hp]["loss"])
    return losses, stats


def test_kl_end_to_end_trains_the_sae_and_not_the_model(tmp_path, topics):
    feed, cfg, hp, batches = _feed(tmp_path, topics, "kl")
    before = {n: p.clone() for n, p in feed.model.named_parameters()}
    losses, stats = _train(feed, cfg, hp, batches, 40)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5  # the splice learns to pass through
    assert stats[hp]["l0"] <= 8 and stats[hp]["fvu"] > 0
    for name, p in feed.model.named_parameters():
        assert p.grad is None and torch.equal(p, before[name]), name


def test_ce_end_to_end_approaches_the_clean_models_loss(tmp_path, topics):
    import torch.nn.functional as F

    feed, cfg, hp, batches = _feed(tmp_path, topics, "ce")
    b = batches[0]
    with torch.no_grad():
        logits = feed.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    valid = (b["attention_mask"][:, 1:] * b["attention_mask"][:, :-1]).bool()
    clean = F.cross_entropy(logits[:, :-1][valid], b["input_ids"][:, 1:][valid]).item()
    losses, _ = _train(feed, cfg, hp, batches, 40)
    assert losses[0] > clean  # a fresh SAE in the residual stream hurts the model
    assert losses[-1] - clean < 0.5 * (losses[0] - clean)  # training closes most of the gap
