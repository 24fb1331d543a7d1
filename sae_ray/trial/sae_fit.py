"""The SAE fit as a stage of a trial's Train run: the artifact, each rank's share of the
token rows, the planned peers it co-trains (`cofit.py`), and where its checkpoints go (with
the fault point the chaos tests kill it at)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from sae_ray import storage, telemetry
from sae_ray.config import SHUFFLE_BUFFER_TOKENS, Config, Sae
from sae_ray.distributed.ranks import barrier, broadcast, rank_world, shared_artifact
from sae_ray.lm.extraction import Manifest, read_manifest
from sae_ray.method.seeds import stream
from sae_ray.sae.checkpoints import save_checkpoint, store_checkpoint, stored_checkpoint
from sae_ray.sae.feeds import activation_dataset, held, worker_feed
from sae_ray.sae.fit import Fit
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.model import SparseAutoencoder
from sae_ray.sae.trainer import fit_metrics, fit_saes
from sae_ray.storage.artifacts import Artifact
from sae_ray.trial import cofit
from sae_ray.trial.record import running_points

if TYPE_CHECKING:
    from sae_ray.trial.stages import Trial

log = logging.getLogger(__name__)


def feed_split(tokens: str, manifest: Manifest, hp: str, feed: str) -> tuple[Any, Any]:
    """This rank's equal share of the token rows, as (shard, feed factory) for `fit_saes`.

    `workers` (the `sae.feed` default): each rank reads its contiguous share itself, with
    pyarrow (`feeds.worker_feed`): no Ray task, so the fit needs no CPU beyond its workers'
    (a cluster that lost a node has none to spare), and a set that fits in memory is read
    once, not every epoch. `ray_data`: one Ray Dataset split across the ranks (rank 0 plans
    it; each rank receives its iterator)."""
    if feed == "workers":
        return None, worker_feed(tokens, manifest, [hp])
    rank, world = rank_world()
    splits = None
    if rank == 0:
        dataset, _ = activation_dataset(tokens, [hp])
        splits = dataset.streaming_split(world, equal=True)
    return broadcast(splits)[rank], None


# Fault injection for chaos tests, "CYCLE:STEP[:STRATEGY]": the last rank of every SAE fit
# of cycle CYCLE (of a trial of STRATEGY, its own chain, not its paired control's)
# SIGKILLs itself once the step-STEP checkpoint is stored. A restarted group resumes the
# fit from that checkpoint, past STEP, so each fit is killed once.
KILL_SAE_FIT_AT = "SAE_RAY_KILL_SAE_FIT_AT"
# The same point for a lost machine: the first fit to reach it (one in the whole sweep)
# writes its last rank's node id to the file HOLD_NOTE names, then waits there for the
# test to kill that node.
HOLD_SAE_FIT_AT, HOLD_NOTE = "SAE_RAY_HOLD_SAE_FIT_AT", "SAE_RAY_HOLD_NOTE"


def keep_checkpoint(fit: Fit, location: str, fault_point: str) -> None:
    """Store the fit's checkpoint (rank 0); `fault_point` ("CYCLE:{}:STRATEGY") is where
    this fit stands for the fault points above."""
    if fit.rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp), fit.published(), fit.opts, fit.trackers, fit.progress)
            store_checkpoint(Path(tmp), location)
    here = fault_point.format(fit.progress.step)
    for variable, fault in ((KILL_SAE_FIT_AT, _kill), (HOLD_SAE_FIT_AT, _hold)):
        wanted = os.environ.get(variable, "")
        if wanted and (here == wanted or here.startswith(f"{wanted}:")):
            barrier()  # the checkpoint is stored
            if fit.rank == rank_world()[1] - 1:
                fault()


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _hold() -> None:
    note = os.environ[HOLD_NOTE]
    mine = f"{note}.{os.getpid()}"
    Path(mine).write_text(ray.get_runtime_context().get_node_id())
    try:
        os.link(mine, note)  # whole, and only the first fit's: a link fails if it exists
    except FileExistsError:
        return
    finally:
        os.remove(mine)
    time.sleep(3600)


def sae_train_config(
    cfg: Config,
    hp: str,
    d_in: int,
    cycle: int,
    variants: list[dict[str, Any]] | None = None,
    sae_seed: int | None = None,
) -> SaeTrainConfig:
    """The sweep's `sae` section is the trainer's config; the fit adds where it runs (and
    the peers it co-trains, `cofit.py`). Its SAE starts from `sae_seed`'s stream (default:
    the experiment's seed); its rows come in the experiment seed's order."""
    seed = cfg.experiment.seed if sae_seed is None else sae_seed
    return SaeTrainConfig(
        **cfg.sae.model_dump(),
        hookpoints=[hp],
        d_in=d_in,
        init_seed=stream(seed, cycle, "sae"),
        shuffle_buffer_tokens=SHUFFLE_BUFFER_TOKENS,
        shuffle_seed=stream(cfg.experiment.seed, cycle, "sae_order"),
        progress=False,  # Tune reports
        run_name=f"sae-c{cycle}",
        sweep=cfg.experiment.name,
        variants=variants or [],
    )


def sae_spec(
    trial: Trial, acts: Artifact, cycle: int, section: Sae, manifest: Manifest
) -> dict[str, Any]:
    """What determines an SAE artifact: its activations, its `sae` section, seed and ranks,
    and the order its rows come in (held and permuted whole, or a stream's shuffle)."""
    spec = {
        "parent": acts.key,
        "sae": section.model_dump(exclude={"save_every", "num_latents"}),
        "seed": stream(trial.sae_seed, cycle, "sae"),
        "workers": trial.cfg.resources.num_workers,
        "shuffle_buffer_tokens": SHUFFLE_BUFFER_TOKENS,
        "order": "held" if section.feed == "workers" and held(manifest) else section.feed,
    }
    if section.num_latents is not None:  # sized by expansion_factor: no num_latents in it
        spec["sae"]["num_latents"] = section.num_latents
    return spec


def fitted_sae(trial: Trial, acts: Artifact, hp: str, cycle: int) -> Artifact:
    """The cycle's SAE, fitted by every rank on its split of the train token rows, with
    the planned peers that read the same activations (`cofit.py`). Its checkpoints go to
    `<train_runs>/sae-<key>`, named after the artifact, so a restarted worker group or
    sweep continues the fit from the last one."""
    cfg, store = trial.cfg, trial.store
    tokens = acts.uri("train", "tokens")
    manifest = read_manifest(tokens)
    spec = sae_spec(trial, acts, cycle, cfg.sae, manifest)
    checkpoints = storage.join(trial.train_runs, f"sae-{store.key('sae', spec)}")

    def make(out: str, lead: bool) -> None:
        # rank 0 reads the running trials' points (they come and go): one list for every rank
        fitting = broadcast(_fitting_peers(trial, cycle, manifest.d) if lead else None)
        peers = [
            (
                {**cofit.override(cfg.sae, s), **_seed_change(trial, seed, cycle)},
                sae_spec(replace(trial, sae_only_seed=seed), acts, cycle, s, manifest),
            )
            for s, seed in fitting
        ]
        try:
            _fit(trial, hp, cycle, (tokens, manifest), Path(out), lead, checkpoints, peers)
        except FloatingPointError:
            if not peers:
                raise
            # one diverging peer must not fail this trial: fit alone (the peers' own
            # trials will meet their divergence themselves)
            log.warning("a co-trained SAE diverged: fitting %s's alone", hp)
            if lead:
                storage.remove(checkpoints)
            barrier()
            _fit(trial, hp, cycle, (tokens, manifest), Path(out), lead, checkpoints, [])

    art = shared_artifact(store, "sae", spec, make, everyone=True)
    if rank_world()[0] == 0:
        storage.remove(checkpoints)  # the SAE is in the store; its checkpoints are disk
    return art


def _fitting_peers(trial: Trial, cycle: int, d_in: int) -> list[tuple[Sae, int]]:
    """The SAEs (section, SAE seed) this fit may co-train: the peers' under this seed, and
    with `search.seeds_vary: sae` every seed's of its own and the peers' sections."""
    points = trial.plan + running_points(trial.train_runs)
    peers = cofit.peer_saes(trial.cfg, points, trial.strategy, cycle)
    seeds = cofit.peer_seeds(trial.cfg, trial.strategy, cycle, trial.seeds())
    out = []
    for section in [trial.cfg.sae, *peers]:
        with contextlib.suppress(ValueError):  # a point its own trial refuses
            section.check_fits(d_in)
            out += [(section, seed) for seed in seeds or [trial.sae_seed]]
    return [(s, seed) for s, seed in out if (s, seed) != (trial.cfg.sae, trial.sae_seed)]


def _seed_change(trial: Trial, seed: int, cycle: int) -> dict[str, int]:
    """A co-trained SAE's own init seed, where it is not this fit's."""
    return {} if seed == trial.sae_seed else {"init_seed": stream(seed, cycle, "sae")}


def _fit(
    trial: Trial,
    hp: str,
    cycle: int,
    rows: tuple[str, Manifest],
    out: Path,
    lead: bool,
    checkpoints: str,
    peers: list[tuple[Sae, dict[str, Any]]],
) -> None:
    """Train this trial's SAE (and the peers rank 0 claims) on the token rows (`rows`: where
    they are and their manifest) and, on rank 0, write each one's artifact: its own into
    `out`, each claimed peer into its scratch."""
    cfg, (tokens, manifest) = trial.cfg, rows
    with contextlib.ExitStack() as stack:
        claimed = cofit.Group()
        if lead and peers:
            claimed = cofit.claim_peers(stack, trial.store, peers, checkpoints)
        overrides = broadcast(claimed.overrides if lead else None)
        variants = cofit.Group(overrides).variants
        fit_cfg = sae_train_config(cfg, hp, manifest.d, cycle, variants, trial.sae_seed)
        shard, feed = feed_split(tokens, manifest, hp, cfg.sae.feed)
        fit = fit_saes(
            {"cfg": fit_cfg.model_dump(), "rows": manifest.rows, "feed": feed},
            shard,
            stored_checkpoint(checkpoints),
            lambda f: keep_checkpoint(f, checkpoints, f"{cycle}:{{}}:{trial.strategy}"),
        )
        if not lead:
            return
        metrics = fit_metrics(fit)
        metrics["tokens_per_s"] = metrics.pop("run_tokens") / max(metrics.pop("elapsed_s"), 1e-9)
        saes = fit.published()
        if not overrides:
            _save_sae(saes[hp], metrics, out)
        else:  # a claimed peer's scratch is published, its lock released, as `stack` closes
            for name, place in {cofit.OWN: out, **claimed.scratches}.items():
                if place is not None:
                    member = cofit.member_metrics(metrics, name, hp)
                    _save_sae(saes[f"{name}/{hp}"], member, place)
    # The workers report it live, but a short fit ends before their last export.
    telemetry.sae_tokens_per_s(cfg.experiment.name, hp, metrics["tokens_per_s"])


def _save_sae(model: SparseAutoencoder, metrics: dict[str, Any], out: Path) -> None:
    model.save(out)
    (out / "train_metrics.json").write_text(json.dumps(metrics))
