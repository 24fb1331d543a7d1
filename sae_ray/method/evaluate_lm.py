"""A causal LM's cycle metrics (`model.task: causal_lm`): perplexity, the SAE spliced in
(SAEBench's CE loss score and KL) and the intervention curve over `k_sharp`. Run by one
process (rank 0's evaluation, or `sae-ray intervene`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sae_ray.lm.batching import encode, lm_batch_rows
from sae_ray.lm.models import Classifier
from sae_ray.lm.text_data import Split
from sae_ray.method.cpt import next_token_ce, sharpened
from sae_ray.method.finetune import perplexity_on, spliced_at
from sae_ray.sae.model import SparseAutoencoder


def splice(sae: SparseAutoencoder, k_sharp: int | None = None):
    """h -> the SAE's (sharpened) reconstruction: what replaces the block's output."""
    return lambda x: sharpened(sae, x, k_sharp)


def ppl(clf: Classifier, split: Split, block: int, layer: int | None = None, fn=None) -> float:
    """Perplexity over the split on this process, with `fn` spliced in at `layer`."""
    return perplexity_on(clf, split, block, layer=layer, splice=fn, everyone=False)


@torch.no_grad()
def splice_scores(
    clf: Classifier, sae: SparseAutoencoder, split: Split, block: int, layer: int
) -> dict[str, float]:
    """The SAE spliced in for the block's output on real tokens: the CE it costs, KL(clean
    ‖ spliced) per scored token, and SAEBench's CE loss score, (CE_zero − CE_sae) /
    (CE_zero − CE_clean): 1 when the reconstruction keeps all of the model's loss, 0 when
    it is no better than zeroing the layer."""
    device = next(clf.model.parameters()).device
    sae = sae.to(device).eval()
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0}
    tokens = 0.0
    replace = {"sae": splice(sae), "zero": torch.zeros_like}
    rows = lm_batch_rows(block)
    for start in range(0, len(split), rows):
        b = encode(clf, split, np.arange(start, min(start + rows, len(split))), block)
        ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
        clean = clf.model(input_ids=ids, attention_mask=mask).logits
        ce, n = next_token_ce(clean, ids, mask)
        sums["clean"] += float(ce)
        tokens += float(n)
        for name, fn in replace.items():
            with spliced_at(clf.model, layer, mask.bool(), fn):
                logits = clf.model(input_ids=ids, attention_mask=mask).logits
            sums[name] += float(next_token_ce(logits, ids, mask)[0])
            if name == "sae":
                sums["kl"] += _kl_sum(clean, logits, mask)
    ce = {k: v / max(tokens, 1.0) for k, v in sums.items()}
    gap = ce["zero"] - ce["clean"]
    return {
        "sae/spliced_ce": ce["sae"],
        "sae/spliced_kl": ce["kl"],
        "sae/clean_ce": ce["clean"],
        "sae/zero_ablation_ce": ce["zero"],
        "sae/ce_loss_score": (ce["zero"] - ce["sae"]) / gap if abs(gap) > 1e-12 else math.nan,
    }


def _kl_sum(clean: torch.Tensor, spliced: torch.Tensor, mask: torch.Tensor) -> float:
    """Σ KL(clean ‖ spliced) over the positions next-token CE scores."""
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    p = F.log_softmax(clean[:, :-1][valid].float(), -1)
    q = F.log_softmax(spliced[:, :-1][valid].float(), -1)
    return float(F.kl_div(q, p, log_target=True, reduction="sum"))


def intervention_curve(
    clf: Classifier,
    sae: SparseAutoencoder,
    split: Split,
    block: int,
    layer: int,
    ks: list[int],
) -> list[dict[str, Any]]:
    """Perplexity with the layer's output replaced by the sharpened reconstruction, for
    each `k_sharp` (the seed's way of choosing it), then the full reconstruction and the
    clean model. `k_sharp >= k` is the full reconstruction."""
    device = next(clf.model.parameters()).device
    sae = sae.to(device).eval()
    rows = [
        {
            "k_sharp": k,
            "kind": "sharpened",
            "perplexity": ppl(clf, split, block, layer, splice(sae, k)),
        }
        for k in ks
    ]
    full = ppl(clf, split, block, layer, splice(sae))
    rows.append({"k_sharp": sae.cfg.k, "kind": "reconstruction", "perplexity": full})
    rows.append({"k_sharp": None, "kind": "clean", "perplexity": ppl(clf, split, block)})
    clean = rows[-1]["perplexity"]
    for row in rows:
        row["degradation_pct"] = 100.0 * (row["perplexity"] / clean - 1.0)
    return rows
