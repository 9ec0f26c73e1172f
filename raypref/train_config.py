"""The preference-training job's config (``raypref.train``): model (LoRA), data, loss, optimizer and
run sections, validated on construction; the CPU and 8 x H100 presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from raypref.config import check
from raypref.losses import WEIGHT_KINDS
from raypref.raytrain import RunSection

METHODS = ("dpo", "rankdpo", "balanced", "sft")


@dataclass(frozen=True)
class ModelSection:
    path: str = field(
        default="shipped",
        metadata={"help": 'a saved pipeline (diffusers format), a hub id on a cluster, or "shipped"'},
    )
    lora: bool = True
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    lora_seed: int = field(
        default=0,
        metadata={"help": "LoRA init is seeded: every worker (and every re-run) starts from the same adapter"},
    )

    def __post_init__(self):
        check(bool(self.path), "model.path must not be empty")
        check(self.lora_rank >= 1, f"model.lora_rank must be >= 1, got {self.lora_rank}")
        check(self.lora_alpha > 0, f"model.lora_alpha must be > 0, got {self.lora_alpha}")
        check(0 <= self.lora_dropout < 1, f"model.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check(len(self.lora_targets) >= 1, "model.lora_targets must name at least one module")


@dataclass(frozen=True)
class DataSection:
    path: str = "~/raypref_runs/prefs/shapes.parquet"
    format: str = field(default="auto", metadata={
        "help": "raypref (K-image ranking rows) | pickapic (caption, jpg_0, jpg_1, label_0 pairs) "
                "| auto (from the first file's columns)"})
    ties: str = field(default="skip", metadata={
        "help": "skip | keep: a tie (Pick-a-Pic label_0 = 0.5, or a row whose phi are all equal) is skipped, "
                "or trained at label 0.5 (loss.method=dpo only: its loss pulls the pair's margin to 0)"})
    seed: int = field(default=0, metadata={"help": "noise / timestep stream"})
    # A small preference set then costs one Ray Data execution instead of one per epoch (seconds each),
    # and one VAE encoding per image instead of one per epoch (a tenth of a DPO step).
    cache: str = field(default="latents", metadata={
        "help": "none | rows | latents: after the first epoch replay the worker's shard from memory (rows), "
                "and each image's VAE latents too, so later epochs skip decoding and the encoder (latents; "
                "exact, the posterior mean). none for shards that do not fit in a worker's memory"})
    # Fraction of rows trained with the empty prompt (diffusers' ``proportion_empty_prompts``). A model
    # sampled with classifier-free guidance needs it: without it the unconditional branch drifts as the
    # weights move, and guidance (scale w) amplifies that drift by w - 1.
    cfg_dropout: float = 0.0

    def __post_init__(self):
        check(bool(self.path), "data.path must not be empty")
        check(self.format in ("auto", "raypref", "pickapic"),
              f"data.format must be auto, raypref or pickapic, got {self.format!r}")
        check(self.cache in ("none", "rows", "latents"),
              f"data.cache must be none, rows or latents, got {self.cache!r}")
        check(self.ties in ("skip", "keep"), f"data.ties must be skip or keep, got {self.ties!r}")
        check(0 <= self.cfg_dropout < 1, f"data.cfg_dropout must be in [0, 1), got {self.cfg_dropout}")


@dataclass(frozen=True)
class LossSection:
    method: str = field(default="dpo", metadata={"help": "dpo | rankdpo | balanced | sft"})
    beta: float = field(
        default=2000.0, metadata={"help": "paper (Diffusion-DPO) convention for every method; rankdpo uses beta / 2"}
    )
    dpo_pairs: str = field(
        default="best_worst", metadata={"help": 'dpo: (best, worst) by phi per prompt, or "all" ordered pairs'}
    )
    rank_weights: str = field(default="dcg", metadata={"help": "rankdpo: dcg | gain | uniform"})
    vote_weighting: bool = field(
        default=False, metadata={"help": "balanced: weight pairs by (votes_i - votes_j) / (votes_i + votes_j)"}
    )
    ref_refresh_every: int = field(
        default=0, metadata={"help": "balanced: copy policy -> reference every N steps (0 = never)"}
    )
    sft_target: str = field(
        default="best", metadata={"help": 'sft: "best" image by phi, or "generator" (all images of sft_generator)'}
    )
    sft_generator: str = ""
    # dpo | rankdpo | balanced: add sft_weight x the winner's (rankdpo: the top image's) denoising error
    # per prompt (RPO-style). Without it a small preference set is fitted by making every image worse
    # (winner error up, loser error up faster): the loss falls while samples degrade. Scale: at the
    # start the preference loss pulls on the winner's error with about beta / 4, so values that matter
    # are in the hundreds for beta = 2000.
    sft_weight: float = 0.0
    t_logit_mean: float | None = field(
        default=None,
        metadata={"help": "flow models: mean of the logit-normal the training noise levels are drawn from (None: "
                          "the scheduler's, 0 as in SD3 pretraining); > 0 weights the high-noise steps where layout, "
                          "count and colour are decided (docs/results.md, movability)"},
    )

    def __post_init__(self):
        check(self.t_logit_mean is None or (math.isfinite(self.t_logit_mean) and abs(self.t_logit_mean) <= 10),
              f"loss.t_logit_mean must be None or a finite value in [-10, 10], got {self.t_logit_mean}")
        check(math.isfinite(self.sft_weight) and self.sft_weight >= 0,
              f"loss.sft_weight must be >= 0, got {self.sft_weight}")
        check(self.sft_weight == 0 or self.method != "sft", "loss.sft_weight is for dpo|rankdpo|balanced, not sft")
        check(self.method in METHODS, f"loss.method must be one of {METHODS}, got {self.method!r}")
        check(math.isfinite(self.beta) and self.beta > 0, f"loss.beta must be > 0, got {self.beta}")
        check(
            self.dpo_pairs in ("best_worst", "all"), f"loss.dpo_pairs must be best_worst|all, got {self.dpo_pairs!r}"
        )
        check(self.rank_weights in WEIGHT_KINDS, f"loss.rank_weights must be one of {WEIGHT_KINDS}, "
                                                 f"got {self.rank_weights!r}")
        check(self.ref_refresh_every >= 0, f"loss.ref_refresh_every must be >= 0, got {self.ref_refresh_every}")
        check(self.ref_refresh_every == 0 or self.method == "balanced",
              f"loss.ref_refresh_every is a BalancedDPO option, got it with method {self.method!r}")
        check(self.sft_target in ("best", "generator"), f"loss.sft_target must be best|generator, "
                                                        f"got {self.sft_target!r}")
        check(self.sft_target != "generator" or bool(self.sft_generator),
              "loss.sft_target='generator' needs loss.sft_generator")


@dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-4
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 20
    batch_size: int = field(
        default=16, metadata={"help": "prompts per optimizer step, global (workers x grad_accum x micro-batch)"}
    )
    grad_accum: int = 1
    max_steps: int = 500
    grad_clip: float = field(default=1.0, metadata={"help": "<= 0: no clipping"})
    precision: str = field(
        default="auto", metadata={"help": "auto (bf16 on CUDA if supported, else fp32) | fp32 | bf16 | fp16"}
    )

    def __post_init__(self):
        check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        check(self.batch_size >= 1 and self.max_steps >= 1, "optim.batch_size and optim.max_steps must be >= 1")
        check(self.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.precision in ("auto", "fp32", "bf16", "fp16"),
              f"optim.precision must be auto|fp32|bf16|fp16, got {self.precision!r}")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=lambda: RunSection(name="prefs-shapes"))

    def __post_init__(self):
        per = self.run.num_workers * self.optim.grad_accum
        check(self.optim.batch_size % per == 0,
              f"optim.batch_size {self.optim.batch_size} must divide by run.num_workers x optim.grad_accum = {per}")
        # Only DPO's loss has a label to set to 0.5; RankDPO and BalancedDPO give a tie zero weight, SFT no winner.
        check(self.data.ties == "skip" or self.loss.method == "dpo",
              f"data.ties=keep needs loss.method=dpo (a tie trains at label 0.5), got loss.method={self.loss.method}")

    @property
    def micro_batch_size(self) -> int:
        return self.optim.batch_size // (self.run.num_workers * self.optim.grad_accum)


def shapes_cpu() -> TrainConfig:
    """LoRA Diffusion-DPO of the shapes base model on a 2-core CPU."""
    return TrainConfig()


def sdxl_8xh100() -> TrainConfig:
    """Example (not run here): full Diffusion-DPO of SDXL on 8 x H100, after Wallace et al.'s recipe.

    2048 pairs per step = 8 workers x 128 accumulation x 2 prompts; lr 1e-8 scaled by the batch
    (2.048e-5), paper beta 5000, bf16 autocast. ``model.path`` is a local diffusers snapshot.
    """
    return TrainConfig(
        model=ModelSection(path="/models/stable-diffusion-xl-base-1.0", lora=False),
        data=DataSection(path="s3://my-bucket/prefs/synpic.parquet"),
        loss=LossSection(method="dpo", beta=5000.0),
        optim=OptimSection(lr=2.048e-5, weight_decay=1e-2, warmup_steps=200, batch_size=2048, grad_accum=128,
                           max_steps=2000, precision="bf16"),
        run=RunSection(name="dpo-sdxl", storage_path="s3://my-bucket/runs", num_workers=8, cpus_per_worker=8,
                       use_gpu=True, checkpoint_every=200, log_every=10),
    )


PRESETS = {"shapes_cpu": shapes_cpu, "sdxl_8xh100": sdxl_8xh100}
