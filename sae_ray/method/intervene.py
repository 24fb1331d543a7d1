"""The intervention curve of a causal LM sweep (`sae-ray intervene`): for each SAE of a
cycle in the sweep's artifact store, the validation perplexity with the hooked layer's
output replaced by the SAE's reconstruction sharpened to `k_sharp` latents, for several
`k_sharp`, beside the full reconstruction and the clean model. The seed picks `k_sharp`
as the lowest whose degradation stays under a stated bound.

It reads finished artifacts only (the sweep, or `sae-ray run`, made them) and runs in this
process: one model and one SAE at a time, no Ray."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sae_ray import storage
from sae_ray.config import Config, ConfigError
from sae_ray.lm.batching import packed
from sae_ray.lm.models import load_classifier
from sae_ray.lm.text_data import load_text_data
from sae_ray.method.evaluate_lm import intervention_curve
from sae_ray.sae.model import SparseAutoencoder
from sae_ray.storage.artifacts import DONE, Artifact


@dataclass
class Fitted:
    """An SAE of the store with the model whose activations it was trained on."""

    sae: Artifact
    model: Artifact
    layer: int
    cycle: int
    strategy: str
    seed: int | None


def _spec(art: Artifact) -> dict[str, Any]:
    return json.loads(storage.read_bytes(art.uri("spec.json")))


def fitted_saes(cfg: Config, cycle: int) -> list[Fitted]:
    """The store's SAEs of cycle `cycle`, traced to their models through the specs."""
    root = cfg.trial_dirs("intervene")[0]
    if not storage.is_dir(root):
        raise ConfigError(f"{root}: no artifact store; run the sweep first")
    found = []
    for name in sorted(storage.listdir(root)):
        if not name.startswith("sae-") or not storage.is_file(storage.join(root, name, DONE)):
            continue
        sae = Artifact(storage.join(root, name), name.removeprefix("sae-"))
        acts_key = _spec(sae)["parent"]
        acts = Artifact(storage.join(root, f"activations-{acts_key}"), acts_key)
        acts_spec = _spec(acts)
        model = Artifact(storage.join(root, f"model-{acts_spec['parent']}"), acts_spec["parent"])
        model_spec = _spec(model)
        if model_spec.get("cycle", 0) != cycle:
            continue
        found.append(
            Fitted(
                sae,
                model,
                acts_spec["layer"],
                cycle,
                model_spec.get("strategy", "cycle 0"),
                model_spec.get("seed"),
            )
        )
    if not found:
        raise ConfigError(f"{root}: no finished SAE of cycle {cycle}; run the sweep first")
    return found


def curves(cfg: Config, ks: list[int], cycle: int = 0) -> list[dict[str, Any]]:
    """One intervention curve per SAE of the cycle, as CSV rows."""
    if not cfg.is_lm:
        raise ConfigError("model.task: the intervention curve is for causal_lm sweeps")
    data = load_text_data(cfg.dataset, cfg.dataset.split_for(cfg.experiment.seed), documents=True)
    rows: list[dict[str, Any]] = []
    for fit in fitted_saes(cfg, cycle):
        clf = load_classifier(fit.model.local())
        split = packed(clf.tokenizer, data, cfg.model.max_length).splits["validation"]
        sae = SparseAutoencoder.load(fit.sae.local())
        for row in intervention_curve(clf, sae, split, cfg.model.max_length, fit.layer, ks):
            rows.append(
                {
                    "sae": fit.sae.key,
                    "cycle": fit.cycle,
                    "model_strategy": fit.strategy,
                    "k": sae.cfg.k,
                    "latents": sae.cfg.num_latents,
                    **row,
                }
            )
    return rows


def lowest_k_sharp(rows: list[dict[str, Any]], max_degradation_pct: float) -> dict[str, Any]:
    """Per SAE, the smallest sharpened `k_sharp` whose perplexity rises at most
    `max_degradation_pct` over the clean model (None when none does)."""
    best: dict[str, Any] = {}
    for row in rows:
        best.setdefault(row["sae"], None)
        if row["kind"] == "sharpened" and row["degradation_pct"] <= max_degradation_pct:
            current = best[row["sae"]]
            best[row["sae"]] = row["k_sharp"] if current is None else min(current, row["k_sharp"])
    return best
