"""Language-model mode (`model.task: causal_lm`): continued pre-training with online
targets, perplexity, the SAE spliced in and the intervention curve, on a tiny GPT-2 LM
built from a config and the built-in synthetic text."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sae_ray.config import ConfigError, Dataset
from sae_ray.config.loading import validate
from sae_ray.config.search import Constraint
from sae_ray.lm.batching import encode, pack_blocks, packed
from sae_ray.lm.models import blocks, build_classifier, hooked, load_classifier, save_classifier
from sae_ray.lm.text_data import load_text_data, synthetic_text, wikitext_documents
from sae_ray.method.cpt import LmAux, next_token_ce, perplexity, random_directions, sharpened
from sae_ray.method.dictionary import feature_stats
from sae_ray.method.evaluate_lm import (
    intervention_curve,
    ppl,
    splice_scores,
)
from sae_ray.method.finetune import loss_on_batch, perplexity_on
from sae_ray.sae.decoder import max_decoder_cos
from sae_ray.sae.model import SaeConfig, SparseAutoencoder
from sae_ray.sae.trainer import steps_to_fvu
from sae_ray.sweep.tuner import violation

BLOCK = 16


@pytest.fixture(scope="module")
def lm():
    data = load_text_data(Dataset(name="synthetic:text", num_examples=120), documents=True)
    clf = build_classifier("tiny-gpt2", 1, data.splits["train"].texts, 0, BLOCK, lm=True)
    clf.model.eval()  # no dropout: the gradients below are comparable
    return clf, packed(clf.tokenizer, data, BLOCK)


def _sae(d: int = 64, latents: int = 128, k: int = 8, seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d, latents, k))
    sae.encoder.bias.data.normal_(0, 0.05)
    return sae.requires_grad_(False)


def _padded_batch(clf, blocks_split):
    """Four blocks, the last two with a padded tail (mask 0)."""
    batch = encode(clf, blocks_split, np.arange(4), BLOCK)
    batch["attention_mask"][2:, BLOCK - 5 :] = 0
    return batch


def _grads(clf, batch, aux, weight, layer=0):
    clf.model.zero_grad(set_to_none=True)
    loss, parts = loss_on_batch(clf, batch, layer, weight, aux)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in clf.model.named_parameters() if p.grad is not None}
    clf.model.zero_grad(set_to_none=True)
    return grads, parts


def _aux(strategy, weight=1.0, loss="mse"):
    return LmAux(strategy, weight, loss, _sae(), 4, random_directions(0, BLOCK, 64))


@pytest.mark.parametrize("strategy", ["topk_sharp", "random", "l1"])
def test_cpt_aux_gradient_reaches_the_hooked_block_and_nothing_above_it(lm, strategy):
    clf, data = lm
    batch = _padded_batch(clf, data.splits["train"])
    plain, parts0 = _grads(clf, batch, None, 0.0)
    with_aux, parts = _grads(clf, batch, _aux(strategy), 1.0)
    assert "aux" in parts and "aux" not in parts0 and parts["aux"] > 0
    hooked_block = {f"transformer.h.0.{n}" for n, _ in blocks(clf.model)[0].named_parameters()}
    above = {f"transformer.h.1.{n}" for n, _ in blocks(clf.model)[1].named_parameters()}
    moved = [n for n in hooked_block if not torch.allclose(with_aux[n], plain[n], atol=1e-9)]
    assert moved, "the aux term's gradient never reached the hooked block"
    for name in above:  # the aux term reads block 0's output: block 1 gets CE's gradient only
        torch.testing.assert_close(with_aux[name], plain[name], rtol=1e-5, atol=1e-8)


def test_cpt_none_is_next_token_ce_alone(lm):
    clf, data = lm
    batch = _padded_batch(clf, data.splits["train"])
    plain, parts0 = _grads(clf, batch, None, 0.0)
    control, parts = _grads(clf, batch, _aux("none", 0.0), 0.0)
    assert parts == parts0 and set(parts) == {"ce"}
    for name, grad in plain.items():
        assert torch.equal(grad, control[name])


def test_topk_sharp_target_is_the_hand_computation_and_trains_no_sae():
    sae = SparseAutoencoder(SaeConfig(4, 6, 3))
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.arange(24.0).reshape(6, 4).sin())
        sae.encoder.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3, 0.05, -0.1]))
        sae.b_dec.copy_(torch.tensor([0.5, -0.5, 0.25, 0.0]))
        sae.W_dec.copy_(F.normalize(torch.arange(24.0).reshape(6, 4).cos(), dim=-1))
    x = torch.tensor([[1.0, 2.0, -1.0, 0.5], [-0.3, 0.7, 1.5, -2.0]])
    # by hand: pre-activations, the 3 largest (ReLU'd), of those the 2 largest, decoded
    pre = (x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias
    expected = []
    for row in pre:
        top3 = row.topk(3).indices
        keep = top3[row[top3].topk(2).indices]
        z = torch.zeros(6)
        z[keep] = row[keep].clamp_min(0)
        expected.append(z @ sae.W_dec + sae.b_dec)
    target = sharpened(sae, x, 2)
    torch.testing.assert_close(target, torch.stack(expected), rtol=1e-5, atol=1e-6)
    # the online target in a CPT step: h gets gradient, the SAE none
    h = x.clone().requires_grad_(True)
    aux = LmAux("topk_sharp", 1.0, "mse", sae, 2)
    loss = aux.term(h.unsqueeze(0), torch.ones(1, 2, dtype=torch.bool))
    loss.backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert all(p.grad is None for p in sae.parameters())
    torch.testing.assert_close(loss, F.mse_loss(x, torch.stack(expected)), rtol=1e-5, atol=1e-6)


def test_l1_is_lambda_times_the_mean_abs_over_real_tokens_and_dims(lm):
    clf, data = lm
    batch = _padded_batch(clf, data.splits["train"])
    lam = 0.3
    loss, parts = loss_on_batch(clf, batch, -1, lam, _aux("l1", lam))
    with torch.no_grad(), hooked(clf.model, -1) as store:
        logits = clf.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    keep = batch["attention_mask"].bool()
    h = store["h"]
    expected_l1 = float(h[keep].abs().sum() / keep.sum() / h.shape[-1])  # per token and dim
    with_pads = float(h.abs().mean())
    assert parts["aux"] == pytest.approx(expected_l1, rel=1e-5)
    assert abs(expected_l1 - with_pads) > 1e-4 * expected_l1  # the pads would change it
    ce_sum, n = next_token_ce(logits, batch["input_ids"], batch["attention_mask"])
    assert loss.item() == pytest.approx(float(ce_sum / n) + lam * expected_l1, rel=1e-5)


def test_perplexity_is_exp_of_the_token_mean_ce_over_real_tokens():
    # two sequences of 4 positions over a 3-token vocabulary; the second has one pad
    logits = torch.log(
        torch.tensor(
            [
                [[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]],
                [[0.7, 0.2, 0.1], [0.25, 0.5, 0.25], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]],
            ]
        )
    )
    ids = torch.tensor([[0, 1, 2, 0], [2, 0, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    # scored: next tokens of row 0 at positions 0-2 (1, 2, 0), of row 1 at 0-1 (0, 1)
    probs = [0.25, 0.1, 0.2, 0.7, 0.5]
    ce_sum, n = next_token_ce(logits, ids, mask)
    assert int(n) == 5
    hand = math.exp(-sum(math.log(p) for p in probs) / 5)
    assert perplexity(float(ce_sum), float(n)) == pytest.approx(hand, rel=1e-6)


def test_perplexity_on_a_model_matches_a_token_loop(lm):
    clf, data = lm
    split = data.splits["validation"]
    assert split.mask.sum() < split.mask.size  # its last block is padded
    total, count = 0.0, 0
    with torch.no_grad():
        for row in range(len(split)):
            ids = torch.as_tensor(split.tokens[row : row + 1])
            real = int(split.mask[row].sum())
            logits = clf.model(input_ids=ids[:, :real]).logits[0]
            for t in range(real - 1):
                total -= float(F.log_softmax(logits[t], -1)[ids[0, t + 1]])
                count += 1
    assert perplexity_on(clf, split, BLOCK) == pytest.approx(math.exp(total / count), rel=1e-4)


def test_intervention_at_k_sharp_k_is_the_full_reconstruction(lm):
    clf, data = lm
    sae = _sae()
    split = data.splits["validation"]
    rows = intervention_curve(clf, sae, split, BLOCK, -1, [2, 8])
    by = {(r["kind"], r["k_sharp"]): r["perplexity"] for r in rows}
    assert by[("sharpened", 8)] == by[("reconstruction", 8)]
    assert by[("clean", None)] == pytest.approx(perplexity_on(clf, split, BLOCK), rel=1e-9)
    assert by[("sharpened", 2)] != by[("sharpened", 8)]
    scores = splice_scores(clf, sae, split, BLOCK, -1)
    assert math.exp(scores["sae/spliced_ce"]) == pytest.approx(by[("reconstruction", 8)], rel=1e-5)
    assert scores["sae/spliced_kl"] >= 0
    gap = scores["sae/zero_ablation_ce"] - scores["sae/clean_ce"]
    score = (scores["sae/zero_ablation_ce"] - scores["sae/spliced_ce"]) / gap
    assert scores["sae/ce_loss_score"] == pytest.approx(score)


def test_a_splice_of_the_identity_changes_nothing(lm):
    clf, data = lm
    split = data.splits["validation"]
    assert ppl(clf, split, BLOCK, -1, lambda x: x) == pytest.approx(ppl(clf, split, BLOCK))


def test_packing_keeps_every_token_once_and_pads_only_the_last_block(lm):
    clf, _ = lm
    docs = load_text_data(Dataset(name="synthetic:text", num_examples=60), documents=True)
    split = docs.splits["train"]
    blocks_ = pack_blocks(clf.tokenizer, split, BLOCK, first_id=7)
    stream = [t for ids in clf.tokenizer(split.texts)["input_ids"] for t in ids]
    assert blocks_.tokens[blocks_.mask.astype(bool)].tolist() == stream
    assert blocks_.mask[:-1].all() and blocks_.ids[0] == 7
    whole = packed(clf.tokenizer, docs, BLOCK)
    ids = np.concatenate([s.ids for s in whole.splits.values()])
    assert len(set(ids.tolist())) == len(ids)  # unique across the splits


def test_documents_split_whole_and_wikitext_lines_become_articles():
    data = load_text_data(Dataset(name="synthetic:text", num_examples=100), documents=True)
    texts = {name: set(s.texts) for name, s in data.splits.items()}
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    assert synthetic_text(5) == synthetic_text(5)
    lines = [" = A = ", " text one ", "", " = = Sub = = ", " more ", " = B = ", " two "]
    assert wikitext_documents(lines) == ["= A =\ntext one\n= = Sub = =\nmore", "= B =\ntwo"]


def test_an_lm_saves_and_loads_with_its_head(lm, tmp_path):
    clf, data = lm
    save_classifier(clf, tmp_path)
    back = load_classifier(tmp_path)
    assert back.is_lm and type(back.model) is type(clf.model)
    split = data.splits["validation"]
    assert perplexity_on(back, split, BLOCK) == pytest.approx(perplexity_on(clf, split, BLOCK))


def test_feature_statistics():
    sae = _sae(d=8, latents=16, k=2)
    x = np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32)
    stats = feature_stats(sae, [x])
    codes = sae.encode(torch.from_numpy(x))
    fired = torch.zeros(16)
    for row_idx, row_val in zip(codes.indices, codes.values, strict=True):
        fired[row_idx[row_val > 0]] += 1
    density = (fired / 500).numpy()
    assert stats["features/density_above_1pct"] == pytest.approx((density > 0.01).mean())
    assert stats["features/density_above_10pct"] == pytest.approx((density > 0.1).mean())
    hist = json.loads(stats["features/log10_density_hist"])
    assert sum(hist) == 16 and hist[0] == int((density == 0).sum())
    w = torch.eye(4)
    w[3] = torch.tensor([0.6, 0.8, 0, 0])
    assert max_decoder_cos(w) == pytest.approx(0.8)


def test_steps_to_fvu():
    curve = [1.0] * 10 + [0.5] * 10 + [0.2] * 80
    assert steps_to_fvu(curve) == 25  # the trailing 5-step mean first within 10 % of 0.2
    assert math.isnan(steps_to_fvu([]))
    assert steps_to_fvu([0.3] * 10) == 1


def _lm_config(**sections):
    raw = {
        "experiment": {"name": "cpt"},
        "model": {"name": "tiny-gpt2", "task": "causal_lm"},
        "dataset": {"name": "synthetic:text"},
        "sharpening": {"strategy": "topk_sharp", "k_sharp": 4},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return validate(raw)


def test_strategies_belong_to_their_task():
    cfg = _lm_config()
    assert cfg.is_lm and cfg.aux_loss == "mse"
    with pytest.raises(ConfigError, match="sharpening.strategy: 'per_class' is not a causal_lm"):
        _lm_config(sharpening={"strategy": "per_class"})
    with pytest.raises(ConfigError, match="'topk_sharp' is not a classification"):
        validate({"experiment": {"name": "c"}, "sharpening": {"strategy": "topk_sharp"}})
    with pytest.raises(ConfigError, match="search.space.sharpening.strategy"):
        _lm_config(
            search={"space": {"sharpening.strategy": {"type": "choice", "values": ["centroid"]}}}
        )
    with pytest.raises(ValueError, match="sharpening.k_sharp: keeps 8 latents of k=8"):
        cfg.sharpening.model_copy(update={"k_sharp": 8}).check_changes_targets(8, 64)


def test_the_tax_check_bounds_the_rise_over_cycle_0():
    tax = Constraint(metric="val/perplexity", max_rise_pct=2)
    first = {"val/perplexity": 100.0}
    assert violation([tax], {"val/perplexity": 101.5}, first) == 0
    assert violation([tax], {"val/perplexity": 103.0}, first) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="select on 'val/perplexity'"):
        Constraint(metric="test/perplexity", max_rise_pct=2)


def test_bad_lm_input_is_one_line_and_exit_2(tmp_path, capsys):
    from sae_ray.cli.main import main

    assert main(["intervene", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    assert main(["intervene", str(tmp_path), "--k_sharp", "a,b"]) == 2
    assert "--k_sharp" in capsys.readouterr().err
    yaml = tmp_path / "s.yaml"
    yaml.write_text(
        "experiment: {name: x, storage_path: " + str(tmp_path / "runs") + "}\n"
        "model: {name: tiny-bert, task: causal_lm}\n"
        "dataset: {name: synthetic:text}\nsharpening: {strategy: l1}\n"
    )
    assert main(["run", str(yaml)]) == 2
    err = capsys.readouterr().err
    assert "model.name: tiny-bert is a bert encoder, not a causal LM" in err
    assert not (tmp_path / "runs").exists()
    assert main(["intervene", str(yaml), "model.name=tiny-gpt2"]) == 2
    assert "no artifact store" in capsys.readouterr().err


def test_a_grid_refuses_conditional_entries():
    space = {
        "sharpening.strategy": {"type": "choice", "values": ["topk_sharp", "l1"]},
        "sharpening.k_sharp": {
            "type": "choice",
            "values": [2, 4],
            "when": {"sharpening.strategy": "topk_sharp"},
        },
    }
    with pytest.raises(ConfigError, match="grid runs every combination"):
        _lm_config(search={"algorithm": "grid", "space": space})
