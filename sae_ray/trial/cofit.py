"""Many trials' SAEs on one stream: the SAE fits of a sweep's points on the same activations
are trained together, in one pass over the stream, by the first trial that needs one.

A sweep knows many of its points before it starts (a grid's every combination, the
`points_to_evaluate`, a random search's draws): the driver hands them to every trial as its
`plan`. An adaptive search (TPE, NSGA-II) knows a point only when its trial starts, so each
trial's point is on record while it runs (`running`): trials that run together reach their
SAE stages together (they wait on the same cycle-0 model and activations) and find each
other's points. At a cycle's SAE stage, the planned and running points whose SAE reads the
same activations as this trial's are its *peers*: every point at cycle 0 and on the λ = 0
chain (no SAE upstream of them: only the SAE's own settings differ), and points of the same
SAE-free strategy (random, centroid, l1) later on. The fit trains its own SAE and every
peer SAE that is neither published nor being built by another trial (whose lock it takes
without waiting), each with its own optimizer, dead-latent window and seed, and publishes
each as that peer's artifact: the artifact the peer's trial would have computed alone (same
batches, same steps; `train-sae`'s co-training is bit for bit the solo fit). A sweep's SAE
fits then cost one stream per activations, not one per trial.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_ray import storage
from sae_ray.config import CONTROL, PER_SAE, Config, ConfigError, Sae, apply_params
from sae_ray.sae.fit_config import variant_name
from sae_ray.storage.artifacts import ArtifactStore

log = logging.getLogger(__name__)
SAE_FREE = ("random", "centroid", "l1", CONTROL)  # strategies whose models no SAE shapes
GROUP = "group.json"  # beside a co-fit's checkpoints: the peers it trains


def _upstream(cfg: Config, sae_free_only: bool) -> dict[str, Any]:
    """What the activations of a stage depend on besides the SAE's own settings (more than
    that at times: a mismatch only costs a shared fit, never a wrong one)."""
    tree = cfg.model_dump(exclude={"search", "wandb"})
    for key in PER_SAE:
        tree["sae"].pop(key)
    if sae_free_only:  # cycle 0 and the λ = 0 chain: no strategy reaches them
        tree.pop("sharpening")
        tree["cycles"].pop("aux_weight")
    return tree


def peer_saes(cfg: Config, plan: list[dict[str, Any]], strategy: str, cycle: int) -> list[Sae]:
    """The `sae` sections of the planned points whose SAE at (`strategy`'s chain, `cycle`)
    reads the activations this trial's does, other than its own."""
    if cycle > 0 and strategy not in SAE_FREE:  # an SAE of this trial's shaped the model
        return []
    common = cycle == 0 or strategy == CONTROL
    mine, own = _upstream(cfg, common), cfg.sae
    out: list[Sae] = []
    for params in plan:
        try:
            other = apply_params(cfg, params)
        except ConfigError:  # a point its own trial will refuse
            continue
        if not common and other.strategy != strategy:
            continue
        if _upstream(other, common) == mine and other.sae != own and other.sae not in out:
            out.append(other.sae)
    return out


def peer_seeds(cfg: Config, strategy: str, cycle: int, seeds: list[int]) -> list[int]:
    """With `search.seeds_vary: sae`, the SAE seeds whose SAEs read the activations a
    trial's do (all of its seeds, where no SAE is upstream); none otherwise."""
    if cfg.search.seeds_vary != "sae" or (cycle > 0 and strategy not in SAE_FREE):
        return []
    return seeds


def override(own: Sae, other: Sae) -> dict[str, Any]:
    """`other` as a co-trained variant of `own`: the per-SAE settings that differ."""
    mine, theirs = own.model_dump(include=set(PER_SAE)), other.model_dump(include=set(PER_SAE))
    return {k: theirs[k] for k in PER_SAE if theirs[k] != mine[k]}


@dataclass
class Group:
    """The SAEs one fit trains: its own (`OWN`) and its peers, by variant name; on rank 0,
    where each peer is published (None: trained for a resume's sake, published by another)."""

    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    scratches: dict[str, Path | None] = field(default_factory=dict)

    @property
    def variants(self) -> list[dict[str, Any]]:
        """The fit's `variants` (none for a fit alone: its checkpoints stay as they were)."""
        return [{}, *self.overrides.values()] if self.overrides else []


OWN = variant_name({})


def claim_peers(
    stack: contextlib.ExitStack,
    store: ArtifactStore,
    peers: list[tuple[dict[str, Any], dict[str, Any]]],
    checkpoints: str,
) -> Group:
    """Rank 0: take each peer (its settings where they differ from this fit's SAE, and its
    artifact spec) that nobody has published or is building, holding its lock on `stack`
    until the fit is published. A restarted fit trains the group its checkpoints were made
    with (`GROUP`), claimed or not."""
    recorded_at = storage.join(checkpoints, GROUP)
    recorded = None
    if storage.is_file(recorded_at):
        recorded = json.loads(storage.read_bytes(recorded_at))
    group = Group()
    for change, spec in peers:
        name = variant_name(change)
        if recorded is not None and name not in recorded:
            continue
        _, scratch = stack.enter_context(store.building("sae", spec, wait=False))
        if scratch is None and recorded is None:
            continue  # published, or another trial is building it
        group.overrides[name], group.scratches[name] = change, scratch
    if recorded is None and group.overrides:
        storage.write_bytes(recorded_at, json.dumps(sorted(group.overrides)).encode())
    if group.overrides:
        log.info("co-training %d planned SAEs with this one", len(group.overrides))
    return group


def member_metrics(metrics: dict[str, Any], name: str, hp: str) -> dict[str, Any]:
    """A co-trained SAE's `train_metrics.json` as its fit alone writes it: its own FVU
    curve's steps_to_fvu and statistics under the hookpoint's name (the stream's rate and
    step count are every member's), and how many SAEs the fit trained (`co_trained`)."""
    member = f"{name}/{hp}"
    out = {k: v for k, v in metrics.items() if "/" not in k}
    out["co_trained"] = sum(k.startswith("steps_to_fvu/") for k in metrics)  # SAEs in the fit
    out["steps_to_fvu"] = metrics.get(f"steps_to_fvu/{member}", out.get("steps_to_fvu"))
    suffix = f"/{member}"
    out.update(
        {
            k[: -len(suffix)] + f"/{hp}": v
            for k, v in metrics.items()
            if k.endswith(suffix) and not k.startswith("steps_to_fvu/")
        }
    )
    return out
