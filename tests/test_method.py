"""The original SAE-ception code's bugs, each pinned down for GPT-2 and BERT style models
(tiny ones built from a config, and the real pretrained MiniLM)."""

import numpy as np
import pytest
import torch

from sae_ray.config import Cycles
from sae_ray.lm.batching import batches
from sae_ray.lm.models import blocks, build_classifier, hooked, pooled
from sae_ray.method.finetune import finetune, loss_on_batch
from sae_ray.method.targets import TargetTable


@pytest.fixture(params=["tiny-gpt2", "tiny-bert", "minilm"])
def clf(request, topics):
    model = build_classifier(
        request.param, topics.num_classes, topics.splits["train"].texts, seed=0, max_length=32
    )
    model.model.eval()
    return model


def _head(clf, h_pooled):
    """The model's own path from the last block's pooled row to its logits."""
    m = clf.model
    if clf.model.config.model_type == "gpt2":
        return m.score(m.transformer.ln_f(h_pooled))
    return m.classifier(m.bert.pooler(h_pooled.unsqueeze(1)))


@pytest.mark.parametrize("side", ["right", "left"])
def test_pooled_row_reproduces_logits(clf, topics, side):
    clf.tokenizer.padding_side = side
    batch = next(batches(clf, topics.splits["validation"], 16, 32))
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    with torch.no_grad(), hooked(clf.model, -1) as store:
        logits = clf.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    rebuilt = _head(clf, pooled(store["h"], batch["attention_mask"], clf.pooling))
    torch.testing.assert_close(rebuilt, logits, rtol=1e-4, atol=1e-5)


def test_aux_gradient_reaches_hooked_layer(clf, topics):
    train = topics.splits["train"]
    d = clf.model.config.hidden_size
    targets = TargetTable(train.ids.copy(), torch.randn(len(train), d))
    batch = next(batches(clf, train, 16, 32))
    with_aux, parts = loss_on_batch(clf, batch, 0, 1.0, targets)
    ce_only, _ = loss_on_batch(clf, batch, 0, 0.0, targets)
    assert parts["aux"] > 0
    (with_aux - ce_only).backward()  # the aux term alone
    grads = [p.grad for p in blocks(clf.model)[0].parameters() if p.grad is not None]
    assert grads and max(g.abs().max().item() for g in grads) > 0


def test_targets_follow_their_example_under_shuffling(clf, topics):
    train = topics.splits["train"]
    d = clf.model.config.hidden_size
    rng = np.random.default_rng(0)
    vectors = torch.randn(len(train), d)
    table = TargetTable(train.ids.copy(), vectors.clone())
    own = {int(i): vectors[row] for row, i in enumerate(train.ids)}
    order = rng.permutation(len(train))
    for batch in batches(clf, train, 16, 32, order):
        got = table.lookup(batch["ids"].numpy())
        want = torch.stack([own[int(i)] for i in batch["ids"]])
        torch.testing.assert_close(got, want)
        _, a = loss_on_batch(clf, batch, -1, 1.0, table)
        flip = torch.arange(len(batch["ids"]) - 1, -1, -1)
        reversed_batch = {k: v[flip] for k, v in batch.items()}
        _, b = loss_on_batch(clf, reversed_batch, -1, 1.0, table)
        assert a["aux"] == pytest.approx(b["aux"], rel=1e-5)
    with pytest.raises(KeyError, match="example id"):
        table.lookup(np.array([10**9]))


def test_lambda_zero_trains_like_no_targets(topics):
    cfg = Cycles(epochs=1, lr=1e-3, batch_size=32)
    train = topics.splits["train"]
    runs = []
    for targets in (None, TargetTable(train.ids.copy(), torch.randn(len(train), 64))):
        clf = build_classifier("tiny-gpt2", 4, train.texts, seed=0, max_length=32)
        finetune(clf, train, cfg, -1, 32, seed=0, targets=targets, aux_weight=0.0)
        runs.append(torch.cat([p.detach().flatten() for p in clf.model.parameters()]))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_finetune_ends_at_its_best_validation_epoch(topics):
    """A validation split whose labels are the true ones shifted by one: the better the model
    learns the task, the worse it scores there, so its best epoch is the first, not the last."""
    from sae_ray.lm.text_data import Split
    from sae_ray.method.finetune import predict

    clf = build_classifier("tiny-gpt2", 4, topics.splits["train"].texts, seed=0, max_length=32)
    train = topics.splits["train"]
    shifted = Split(train.ids, train.texts, (train.labels + 1) % 4)
    cfg = Cycles(epochs=4, lr=3e-3, batch_size=16)
    history = finetune(clf, train, cfg, -1, 32, seed=0, val=shifted)
    accs = [h["val_accuracy"] for h in history]
    assert accs[0] > accs[-1]  # the premise: later epochs are worse on this split
    final = float((predict(clf, shifted, 32) == shifted.labels).mean())
    assert final == max(accs)


def test_seeds_vary_training_not_the_split_and_models_are_keyed_on_their_ranks():
    """The held-out examples are the same under every experiment seed (`dataset.split_seed`
    draws them); a fine-tuned model's key names the worker count and strategy it ran on."""
    from sae_ray import config as C
    from sae_ray.lm.text_data import load_text_data
    from sae_ray.trial.sae_fit import sae_train_config
    from sae_ray.trial.stages import model_spec
    from tests.conftest import QUICKSTART

    def cfg(*overrides):
        return C.load(QUICKSTART, list(overrides))

    split = {s: v.ids.tolist() for s, v in load_text_data(cfg().dataset).splits.items()}
    texts = load_text_data(cfg("experiment.seed=3").dataset).splits["test"].texts
    assert texts == load_text_data(cfg().dataset).splits["test"].texts
    other = load_text_data(cfg("dataset.split_seed=1").dataset).splits["test"].texts
    assert other != texts and len(split["test"]) == len(other)
    assert model_spec(cfg()) != model_spec(cfg("resources.num_workers=1"))
    assert model_spec(cfg()) != model_spec(cfg("resources.strategy=fsdp"))
    assert model_spec(cfg()) == model_spec(cfg("sae.k=4"))  # CE alone: shared across SAEs
    seeds = {
        sae_train_config(cfg(f"experiment.seed={s}"), "h", 8, c).init_seed
        for s in range(3)
        for c in range(3)
    }
    assert len(seeds) == 9  # seed s at cycle 1 no longer replays seed s+1 at cycle 0


def _analytic_aux_grad(h, t, form, c):
    """d aux / d h written out: MSE 2(h − t)/(n·d); the cosine about c,
    −(v/(|u||v|) − (u·v) u/(|u|³|v|)) / n with u = h − c, v = t − c."""
    n, d = h.shape
    if form == "mse":
        return 2 * (h - t) / (n * d)
    u, v = h - c, t - c
    nu, nv = u.norm(dim=1, keepdim=True), v.norm(dim=1, keepdim=True)
    dot = (u * v).sum(1, keepdim=True)
    return -(v / (nu * nv) - dot * u / (nu**3 * nv)) / n


@pytest.mark.parametrize("form,centered", [("mse", False), ("cosine", False), ("cosine", True)])
def test_the_aux_forms_gradients_equal_their_formulas(form, centered):
    """cycles.aux_loss: mse and cycles.aux_center change the loss a classifier trains on
    (they were once accepted and ignored): autograd's gradient equals the written-out one."""
    from sae_ray.method.finetune import aux_loss

    g = torch.Generator().manual_seed(0)
    mean = 3.0 * torch.randn(24, generator=g, dtype=torch.float64)
    h = (mean + torch.randn(8, 24, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = mean + torch.randn(8, 24, generator=g, dtype=torch.float64)
    c = mean if centered else torch.zeros(24, dtype=torch.float64)
    aux_loss(h, t, form, c if centered else None).backward()
    want = _analytic_aux_grad(h.detach(), t, form, c)
    torch.testing.assert_close(h.grad.double(), want, rtol=1e-4, atol=1e-7)


def test_the_classifiers_aux_form_is_the_configured_one(clf, topics):
    train = topics.splits["train"]
    d = clf.model.config.hidden_size
    targets = TargetTable(train.ids.copy(), torch.randn(len(train), d), torch.randn(d))
    batch = next(batches(clf, train, 16, 32))
    with torch.no_grad(), hooked(clf.model, 0) as store:
        clf.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    h = pooled(store["h"], batch["attention_mask"], clf.pooling).float()
    t = targets.lookup(batch["ids"].numpy())
    with torch.no_grad():
        _, mse = loss_on_batch(clf, batch, 0, 1.0, targets, aux_form="mse")
        _, cos = loss_on_batch(clf, batch, 0, 1.0, targets)
    assert mse["aux"] == pytest.approx(float(((h - t) ** 2).mean()), rel=1e-4)
    u, v = h - targets.center, t - targets.center
    want = 1 - torch.nn.functional.cosine_similarity(u, v, dim=-1).mean()
    assert cos["aux"] == pytest.approx(float(want), rel=1e-4)
