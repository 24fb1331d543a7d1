"""The sweep YAML's sections, validated: every section forbids unknown keys so a typo fails
loudly instead of silently running the default."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sae_ray import storage
from sae_ray.config.analysis import Analysis
from sae_ray.config.base import Section
from sae_ray.config.sae import Sae
from sae_ray.config.search import Search
from sae_ray.config.sharpening import Sharpening
from sae_ray.config.strategies import (
    CONTROL,
    SHUFFLABLE,
    TASK_STRATEGIES,
    effective_strategy,
)
from sae_ray.config.synthetic import GROUND_TRUTH, Synthetic


class Experiment(Section):
    name: str = Field(
        min_length=1,
        pattern=r"^[A-Za-z0-9_.\-]+$",
        description="the sweep's name: its folder under storage_path, its W&B group",
    )
    storage_path: str = Field(
        "./runs",
        min_length=1,
        description="local directory (relative: to where the sweep is launched), or "
        "s3://bucket/prefix, gs://bucket/prefix",
    )
    seed: int = Field(
        0, ge=0, description="the first experiment seed (numpy's seed sequences take no negatives)"
    )
    shared_filesystem: bool = Field(
        False,
        description="a local storage_path is a filesystem mounted on every node (NFS, EFS, "
        "Lustre): accepted on a cluster of several machines, where a plain local path is not",
    )
    share_artifacts: bool = Field(
        True,
        description="false: each trial computes every stage itself (for measuring what "
        "sharing saves; benchmarks/sweep_sharing.py)",
    )

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, value: str) -> str:
        return storage.check(value)

    @field_validator("name")
    @classmethod
    def _a_folder_name(cls, value: str) -> str:
        if set(value) == {"."}:
            raise ValueError(
                f"{value!r} is not a folder of its own (results go to <storage>/<name>)"
            )
        return value


Task = Literal["classification", "causal_lm"]


class Model(Section):
    name: str = Field(
        "tiny-gpt2",
        description="a preset (tiny-gpt2, tiny-bert, tiny-neox, random-gpt2: random weights "
        "built offline; gpt2, pythia-70m, gpt-neox-20b; minilm: real MiniLM weights from "
        "the minilm extra), a local model folder, or a hub id",
    )
    task: Task = Field(
        "classification",
        description="classification (a sequence classifier; CE + λ·aux at the pooled "
        "position) or causal_lm (the seed's continued pre-training: next-token CE + "
        "λ·aux on every real token; max_length is then the packed block's length)",
    )
    layer: int = Field(-1, description="hooked block index; negative counts from the end")
    max_length: int = Field(
        64, ge=4, description="tokens per example (causal_lm: per packed block)"
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="weights as loaded (bfloat16 halves a large model's memory)"
    )


class Dataset(Section):
    name: str = Field(
        "synthetic:topics",
        description="synthetic:topics (synthetic:text for causal_lm), a local .parquet / "
        ".csv / .jsonl / .txt file or a folder of train / validation / test files, a hub "
        "id with an optional :subset, or a preset (glue/sst2, ag_news, wikitext-2, "
        "wikitext-103, pile)",
    )
    text_column: str = Field("text", description="the column holding each example's text")
    label_column: str = Field("label", description="the column holding its class")
    num_examples: int = Field(2000, ge=40, description="size of the synthetic task")
    max_examples: int | None = Field(None, ge=10, description="cap on the loaded train split")
    val_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="validation carved from train (selection reads it)"
    )
    test_fraction: float = Field(
        0.1,
        gt=0,
        lt=0.5,
        description="held-out test carved from train when the source has no test split",
    )
    split_seed: int | Literal["per_seed"] = Field(
        0,
        description="draws the train / validation / test split: a number fixes it across "
        "experiment seeds (seeds vary the training, not which examples are held out); "
        "per_seed draws it from each experiment seed, so seed-to-seed variance includes "
        "which examples were held out",
    )

    @field_validator("split_seed")
    @classmethod
    def _non_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("must be at least 0 (or per_seed)")
        return value

    def split_for(self, seed: int) -> int:
        """The split seed of experiment seed `seed`."""
        return seed if self.split_seed == "per_seed" else self.split_seed


class Cycles(Section):
    """The classifier's training: the seed's recipe (AdamW 1e-4, weight decay 0.01, 100
    warm-up steps then linear decay, gradient clip 1.0) as defaults."""

    count: int = Field(2, ge=1, description="SAE-ception cycles (cycle 0 is the fine-tune)")
    epochs: int = Field(1, ge=1, description="epochs of every fine-tune (equal compute)")
    aux_weight: float = Field(0.1, ge=0, description="λ in CE + λ·aux(h, t)")
    aux_loss: Literal["cosine", "mse"] | None = Field(
        None,
        description="aux(h, t): 1 − cos(h, t) or MSE(h, t) (mean over examples and "
        "dimensions); default cosine for classification, mse (the seed's CPT) for causal_lm",
    )
    aux_center: bool = Field(
        True,
        description="classification's cosine aux: 1 − cos(h − c, t − c), c the mean of the "
        "training examples' activations the targets were built from. Both vectors share "
        "that mean, which makes any two look alike (the uncentred cosine reads near 1 and "
        "its gradient fades); false: the seed's uncentred 1 − cos(h, t). Measured on the "
        "MiniLM experiment (docs/experiments.md): centred, per_class gained more",
    )
    lr: float = Field(1e-4, gt=0, description="AdamW's learning rate")
    batch_size: int = Field(32, ge=1, description="examples per step, over all workers")
    weight_decay: float = Field(0.01, ge=0, description="AdamW's weight decay")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up, then linear decay to 0")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    start_from: str = Field(
        "finetune",
        min_length=1,
        description="cycle 0: 'finetune' the pretrained model, 'pretrained' (untrained "
        "head, no training), or the path of an already fine-tuned classifier",
    )
    train_layers: Literal["all", "from_hooked"] = Field(
        "from_hooked",
        description="what retraining (cycle > 0) updates: the hooked block, the blocks "
        "above it and the head (the references' choice: what lies below the hook keeps the "
        "cycle-0 features), or everything",
    )
    autocast: bool = Field(True, description="bf16 autocast when the workers have a GPU")

    @field_validator("start_from")
    @classmethod
    def _known_start(cls, value: str) -> str:
        if value not in ("finetune", "pretrained") and not Path(value).expanduser().is_dir():
            raise ValueError(f"{value!r} is neither 'finetune', 'pretrained' nor a model directory")
        return value


def sharpens(cfg: Config) -> bool:
    """Whether the config builds targets at all: a strategy with λ > 0, and a next cycle."""
    return cfg.strategy != CONTROL and cfg.cycles.count > 1


class Resources(Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers of each trial")
    use_gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs each worker reserves")
    max_failures: int = Field(2, ge=0, description="worker-group restarts of a Train run")
    placement: Literal["pack", "spread"] = Field(
        "pack",
        description="a trial's workers on as few nodes as fit (pack: NCCL's fast path within "
        "a node), or one per node where it can (spread)",
    )
    trial_retries: int = Field(1, ge=0, description="re-runs of a failed trial (artifacts kept)")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="fine-tunes: a model replica per worker (ddp), or weights, gradients and "
        "optimizer state sharded over the workers (fsdp: models too big for one device)",
    )
    activation_checkpointing: bool = Field(
        False, description="fine-tunes recompute each block's activations in backward"
    )
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="each GPU worker's memory: the memory plan refuses what won't fit"
    )


class Wandb(Section):
    mode: Literal["offline", "online", "disabled"] = Field(
        "disabled", description="offline: runs under the sweep's folder, `wandb sync` later"
    )
    project: str = Field("sae-ray", description="the W&B project")


class Config(Section):
    experiment: Experiment
    model: Model = Field(default_factory=Model)
    dataset: Dataset = Field(default_factory=Dataset)
    cycles: Cycles = Field(default_factory=Cycles)
    sae: Sae = Field(default_factory=Sae)
    sharpening: Sharpening = Field(default_factory=Sharpening)
    synthetic: Synthetic = Field(default_factory=Synthetic)
    search: Search = Field(default_factory=Search)
    analysis: Analysis = Field(default_factory=Analysis)
    resources: Resources = Field(default_factory=Resources)
    wandb: Wandb = Field(default_factory=Wandb)

    @model_validator(mode="after")
    def _an_autoencoder(self) -> Config:
        if self.sae.transcode:
            raise ValueError(
                "sae.transcode: a sweep's SAE reconstructs the hooked block, whose features "
                "SAE-ception sharpens; train transcoders with train-sae --transcode"
            )
        return self

    @model_validator(mode="after")
    def _strategy_of_task(self) -> Config:
        allowed = TASK_STRATEGIES[self.model.task]
        if self.sharpening.strategy not in allowed:
            raise ValueError(
                f"sharpening.strategy: {self.sharpening.strategy!r} is not a "
                f"{self.model.task} strategy (one of {', '.join(allowed)})"
            )
        if self.cycles.batch_size < self.resources.num_workers:
            raise ValueError(
                f"cycles.batch_size: {self.cycles.batch_size} examples per step cannot be "
                f"split over {self.resources.num_workers} workers (every step would be dropped)"
            )
        primary = self.analysis.primary
        if primary is not None:
            for side in (primary.strategy, primary.against):
                if side not in allowed:
                    raise ValueError(
                        f"analysis.primary: {side!r} is not a {self.model.task} strategy"
                    )
            if isinstance(primary.cycle, int) and primary.cycle >= self.cycles.count:
                raise ValueError(
                    f"analysis.primary.cycle: {primary.cycle} is past the last cycle "
                    f"({self.cycles.count - 1})"
                )
        if self.ground_truth and (self.cycles.count != 1 or self.is_lm):
            raise ValueError(
                f"cycles.count: a ground-truth sweep ({GROUND_TRUTH}) fits one SAE per "
                "trial and seed, no model to sharpen: set cycles.count: 1 (and no causal_lm)"
            )
        if self.sae.target_l0 is not None and self.sae.architecture != "jumprelu":
            raise ValueError(
                f"sae.target_l0: only a jumprelu has an L0 penalty, not "
                f"{self.sae.architecture} (searching sae.architecture? make target_l0 a "
                "search entry `when: {sae.architecture: jumprelu}`)"
            )
        return self

    @property
    def ground_truth(self) -> bool:
        """A ground-truth sweep: SAEs fitted on a synthetic world whose features are known
        (no model, no cycles, no sharpening), scored by SAELens's MCC and F1."""
        return self.dataset.name == GROUND_TRUTH

    @property
    def is_lm(self) -> bool:
        return self.model.task == "causal_lm"

    @property
    def aux_loss(self) -> str:
        """The aux term's form: as set, else the task's (cosine / the seed's MSE)."""
        return self.cycles.aux_loss or ("mse" if self.is_lm else "cosine")

    @property
    def shuffle_base(self) -> str:
        """Whose targets `shuffled` permutes: as set, else the primary contrast's strategy
        when it sharpens SAE codes (X − shuffled then tests X's pairing), else per_class."""
        primary = self.analysis.primary
        if self.sharpening.shuffle_of:
            return self.sharpening.shuffle_of
        return primary.strategy if primary and primary.strategy in SHUFFLABLE else "per_class"

    @property
    def strategy(self) -> str:
        """The strategy this config runs, λ = 0 making it the control (`effective_strategy`)."""
        return effective_strategy(self.sharpening.strategy, self.cycles.aux_weight)

    @property
    def sweep_uri(self) -> str:
        """Where the sweep keeps everything: an absolute local path or a bucket URI."""
        return storage.join(storage.resolve(self.experiment.storage_path), self.experiment.name)

    def trial_dirs(self, trial_id: str) -> tuple[str, str]:
        """The one place of the sweep's folder layout below `sweep_uri` for a trial: its
        artifact store and its Ray Train runs, the sweep's shared ones, or with
        `share_artifacts: false` its own (nothing found, everything computed; its Train runs
        too, since they are named by artifact key and a reused run name restores that run).
        """
        dirs = [storage.join(self.sweep_uri, d) for d in ("artifacts", "train_runs")]
        if not self.experiment.share_artifacts:
            dirs = [storage.join(d, "unshared", trial_id) for d in dirs]
        return dirs[0], dirs[1]

    @property
    def seeds_uri(self) -> str:
        """Each trial's per-seed rows, one JSON list per trial and cycle (seeds.csv's source)."""
        return storage.join(self.sweep_uri, "seeds")

    @property
    def sweep_dir(self) -> Path:
        """The sweep's directory when it is local (object-store sweeps have none)."""
        if storage.is_remote(self.sweep_uri):
            raise ValueError(f"{self.sweep_uri} is not a local directory")
        return Path(self.sweep_uri)
