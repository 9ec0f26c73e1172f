"""Preference training of diffusion models: Diffusion-DPO, RankDPO, BalancedDPO and SFT on Ray Train.

One explicit loop. ``train_func(config)`` is the ``train_loop_per_worker`` of a ``TorchTrainer``;
it reads this worker's shard of the preference Parquet (``raypref.prefdata`` layout) through
``ray.train.get_dataset_shard("train")`` and calls :func:`train_step` once per optimizer step.
:func:`train_step` is a plain function of a :class:`TrainState` and a list of micro-batches of rows,
so tests and benchmarks drive it without Ray.

Design choices (why):

- One forward pass per micro-batch: the images of every prompt that the method needs are stacked
  into one ``[N, C, H, W]`` batch (``N = sum of images per prompt``, e.g. ``B * K``). All images
  of a prompt share one noise draw and one timestep, as Diffusion-DPO / RankDPO require.
- Noise and t are keyed by ``(data.seed, step, prompt_id)``, never by worker or micro-batch, so
  the update does not depend on how rows are split across workers or accumulation steps.
- The loss is ``sum(per-prompt losses) / (prompts in the global step)`` and gradients are SUMMED
  over workers with ``all_reduce`` (as in ``raypref.pretrain``): the update is exactly that of one
  worker holding the global batch. No DDP wrapper, because the reference forward runs through the
  same module with LoRA disabled (DDP's reducer expects one forward per backward).
- Reference model: LoRA -> the same network with adapters disabled (one copy of the weights);
  full fine-tuning -> a frozen deep copy of the denoiser, swapped into the pipeline for the
  reference forward. BalancedDPO's reference refresh (``loss.ref_refresh_every``): full -> copy the
  policy weights into the frozen copy; LoRA -> a second, frozen adapter ``"ref"`` that receives a
  copy of the policy adapter (merge-free: the base weights are never touched, and the reference
  forward activates ``"ref"`` instead of disabling adapters).
- Mixed precision: autocast bf16 (or fp16 with a GradScaler) only on CUDA devices that support it;
  CPU always runs fp32. Per-sample errors are computed in fp32 (``per_sample_error``).
- Non-finite loss: every worker raises ``FloatingPointError`` naming the step before the optimizer
  step, so no checkpoint of a poisoned model is ever written.
- Resume: the checkpoint holds the trainable tensors, optimizer, step and (after a refresh) the
  reference; the data stream restarts at an epoch boundary (noise is keyed by step, so it is fresh).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from raypref.config import check
from raypref.diffusion import per_sample_error
from raypref.losses import (
    WEIGHT_KINDS, balanced_dpo_loss, diffusion_dpo_loss, dpo_metrics, rank_dpo_loss, rank_pair_accuracy, sft_loss,
)

METHODS = ("dpo", "rankdpo", "balanced", "sft")
COLUMNS = ["prompt_id", "prompt", "images", "generators", "phi", "pairs"]
TRAIN_STATE = "train_state.pt"
METRIC_KEYS = {  # per-prompt means reported each step (dpo_metrics' keys for the pairwise methods)
    "pairwise": ("loss", "pref_loss", "implicit_acc", "margin", "reward_w", "reward_l", "kl_proxy", "policy_err", "ref_err"),
    "sft": ("loss", "policy_err"),
}
LORA_DIR = "lora"
PIPELINE_DIR = "pipeline"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelSection:
    path: str = "shipped"  # a saved pipeline (diffusers format), a hub id on a cluster, or "shipped"
    lora: bool = True
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    lora_seed: int = 0  # LoRA init is seeded: every worker (and every re-run) starts from the same adapter

    def __post_init__(self):
        check(bool(self.path), "model.path must not be empty")
        check(self.lora_rank >= 1, f"model.lora_rank must be >= 1, got {self.lora_rank}")
        check(self.lora_alpha > 0, f"model.lora_alpha must be > 0, got {self.lora_alpha}")
        check(0 <= self.lora_dropout < 1, f"model.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check(len(self.lora_targets) >= 1, "model.lora_targets must name at least one module")


@dataclass(frozen=True)
class DataSection:
    path: str = "~/raypref_runs/prefs/shapes.parquet"
    seed: int = 0  # noise / timestep stream
    # Keep the worker's shard in memory after the first epoch, replayed in the same order. A small
    # preference set then costs one Ray Data execution instead of one per epoch (seconds each);
    # turn off for shards that do not fit in a worker's memory.
    cache_shard: bool = True
    # Fraction of rows trained with the empty prompt (diffusers' ``proportion_empty_prompts``). A model
    # sampled with classifier-free guidance needs it: without it the unconditional branch drifts as the
    # weights move, and guidance (scale w) amplifies that drift by w - 1.
    cfg_dropout: float = 0.0

    def __post_init__(self):
        check(bool(self.path), "data.path must not be empty")
        check(0 <= self.cfg_dropout < 1, f"data.cfg_dropout must be in [0, 1), got {self.cfg_dropout}")


@dataclass(frozen=True)
class LossSection:
    method: str = "dpo"  # dpo | rankdpo | balanced | sft
    beta: float = 2000.0  # paper (Diffusion-DPO) convention for every method; rankdpo uses beta / 2
    dpo_pairs: str = "best_worst"  # dpo: (best, worst) by phi per prompt, or "all" ordered pairs
    rank_weights: str = "dcg"  # rankdpo: dcg | gain | uniform
    vote_weighting: bool = False  # balanced: weight pairs by (votes_i - votes_j) / (votes_i + votes_j)
    ref_refresh_every: int = 0  # balanced: copy policy -> reference every N steps (0 = never)
    sft_target: str = "best"  # sft: "best" image by phi, or "generator" (all images of sft_generator)
    sft_generator: str = ""
    # dpo | rankdpo | balanced: add sft_weight x the winner's (rankdpo: the top image's) denoising error
    # per prompt (RPO-style). Without it a small preference set is fitted by making every image worse
    # (winner error up, loser error up faster): the loss falls while samples degrade. Scale: at the
    # start the preference loss pulls on the winner's error with about beta / 4, so values that matter
    # are in the hundreds for beta = 2000.
    sft_weight: float = 0.0

    def __post_init__(self):
        check(math.isfinite(self.sft_weight) and self.sft_weight >= 0,
              f"loss.sft_weight must be >= 0, got {self.sft_weight}")
        check(self.sft_weight == 0 or self.method != "sft", "loss.sft_weight is for dpo|rankdpo|balanced, not sft")
        check(self.method in METHODS, f"loss.method must be one of {METHODS}, got {self.method!r}")
        check(math.isfinite(self.beta) and self.beta > 0, f"loss.beta must be > 0, got {self.beta}")
        check(self.dpo_pairs in ("best_worst", "all"), f"loss.dpo_pairs must be best_worst|all, got {self.dpo_pairs!r}")
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
    batch_size: int = 16  # prompts per optimizer step, global (workers x grad_accum x micro-batch)
    grad_accum: int = 1
    max_steps: int = 500
    grad_clip: float = 1.0  # <= 0: no clipping
    precision: str = "auto"  # auto (bf16 on CUDA if supported, else fp32) | fp32 | bf16 | fp16

    def __post_init__(self):
        check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        check(self.batch_size >= 1 and self.max_steps >= 1, "optim.batch_size and optim.max_steps must be >= 1")
        check(self.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.precision in ("auto", "fp32", "bf16", "fp16"),
              f"optim.precision must be auto|fp32|bf16|fp16, got {self.precision!r}")


@dataclass(frozen=True)
class RunSection:
    name: str = "prefs-shapes"
    storage_path: str = "~/raypref_runs"
    num_workers: int = 1
    cpus_per_worker: float = 2.0
    use_gpu: bool = False
    checkpoint_every: int = 100
    log_every: int = 10
    export_dir: str = ""  # if set, rank 0 also writes the final model here
    max_failures: int = 0
    keep_checkpoints: int = 2  # 0 keeps every checkpoint

    def __post_init__(self):
        check(bool(self.name), "run.name must not be empty")
        check(self.num_workers >= 1, f"run.num_workers must be >= 1, got {self.num_workers}")
        check(self.checkpoint_every >= 1, f"run.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        check(self.log_every >= 1, f"run.log_every must be >= 1, got {self.log_every}")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self):
        per = self.run.num_workers * self.optim.grad_accum
        check(self.optim.batch_size % per == 0,
              f"optim.batch_size {self.optim.batch_size} must divide by run.num_workers x optim.grad_accum = {per}")

    @property
    def micro_batch_size(self) -> int:
        return self.optim.batch_size // (self.run.num_workers * self.optim.grad_accum)


def shapes_cpu() -> TrainConfig:
    """LoRA Diffusion-DPO of the shapes base model on a 2-core CPU."""
    return TrainConfig()


def tiny_test() -> TrainConfig:
    """Seconds-long runs for tests: tiny model (path set by the test), 2 workers, 2 steps."""
    return TrainConfig(
        model=ModelSection(path="/tmp/raypref_tiny_model", lora_rank=4, lora_alpha=4.0),
        data=DataSection(path="/tmp/raypref_tiny_prefs.parquet"),
        loss=LossSection(beta=500.0),
        optim=OptimSection(lr=1e-3, warmup_steps=0, batch_size=4, max_steps=2),
        run=RunSection(name="prefs-tiny", num_workers=2, cpus_per_worker=0.5, checkpoint_every=1, log_every=1),
    )


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


PRESETS = {"shapes_cpu": shapes_cpu, "tiny_test": tiny_test, "sdxl_8xh100": sdxl_8xh100}


# ----------------------------------------------------------------------------- model


def load_model(path: str, device: torch.device | str = "cpu"):
    """A model adapter (``denoiser``, ``noise_schedule``, ``encode_prompts``, ``encode_images``,
    ``predict``, ``save_pretrained``) from a saved pipeline directory; the family (SD1.5, SDXL,
    PixArt, SD3 or the shapes pipeline) comes from its model_index.json. ``shipped`` is the packaged
    shapes base model; a Ray Train checkpoint directory resolves to its ``pipeline/``."""
    from raypref.generators import resolve_checkpoint
    from raypref.models import load_adapter

    local = os.path.expanduser(path)
    if path == "shipped" or os.path.isdir(local):
        local = str(resolve_checkpoint(local if path != "shipped" else path))
    return load_adapter(local, device=device)


def torch_trainer(loop, loop_config: dict, run, datasets: dict | None = None):
    """A Ray Train ``TorchTrainer`` for ``loop`` with the resources, storage and fault tolerance of a
    job's run section (``name, storage_path, num_workers, cpus_per_worker, use_gpu,
    keep_checkpoints, max_failures``); nothing is hard-coded. Re-running with the same
    ``run.name`` and ``run.storage_path`` resumes from the latest checkpoint (Ray Train V2)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage = run.storage_path if "://" in run.storage_path else os.path.abspath(os.path.expanduser(run.storage_path))
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        datasets=datasets,
        torch_config=TorchConfig(backend="nccl" if run.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=run.num_workers,
            use_gpu=run.use_gpu,
            resources_per_worker={"CPU": run.cpus_per_worker, **({"GPU": 1} if run.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run.name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints or None),
            failure_config=FailureConfig(max_failures=run.max_failures),
        ),
    )


def stock_pipeline(pipe):
    """The diffusers pipeline behind an adapter (``raypref.models`` adapters wrap it as ``.pipe``;
    ShapesPipeline is its own)."""
    inner = getattr(pipe, "pipe", None)
    return inner if inner is not None and hasattr(inner, "components") else pipe


def denoiser_attr(pipe) -> str:
    """Name of the stock pipeline's attribute holding the denoiser ("transformer" or "unet")."""
    stock = stock_pipeline(pipe)
    for name in ("transformer", "unet"):
        if getattr(stock, name, None) is pipe.denoiser:
            return name
    raise ValueError(f"{type(pipe).__name__}: denoiser is neither .transformer nor .unet")


@contextlib.contextmanager
def use_denoiser(pipe, module: torch.nn.Module):
    """Temporarily make ``module`` the pipeline's denoiser (the full fine-tuning reference)."""
    name, stock = denoiser_attr(pipe), stock_pipeline(pipe)
    saved = getattr(stock, name)
    object.__setattr__(stock, name, module)  # bypass DiffusionPipeline's config bookkeeping
    try:
        yield
    finally:
        object.__setattr__(stock, name, saved)


def _lora_layers(module: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def add_lora(denoiser: torch.nn.Module, lora_config, adapter_name: str = "default") -> None:
    """diffusers' ``add_adapter`` where the model has it (PeftAdapterMixin: SD3, UNets); peft's
    ``inject_adapter_in_model`` otherwise (PixArt's transformer has no PeftAdapterMixin)."""
    if hasattr(denoiser, "add_adapter"):
        denoiser.add_adapter(lora_config, adapter_name=adapter_name)
        if adapter_name != "default":
            denoiser.set_adapter("default")
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(lora_config, denoiser, adapter_name)
        set_active_adapter(denoiser, "default")


def set_active_adapter(denoiser: torch.nn.Module, name: str) -> None:
    for layer in _lora_layers(denoiser):
        layer.set_adapter(name)


def set_adapters_enabled(denoiser: torch.nn.Module, enabled: bool) -> None:
    """``enable_adapters()`` / ``disable_adapters()`` of diffusers, or the same loop for plain peft."""
    if hasattr(denoiser, "disable_adapters") and getattr(denoiser, "_hf_peft_config_loaded", False):
        denoiser.enable_adapters() if enabled else denoiser.disable_adapters()
        return
    for layer in _lora_layers(denoiser):
        layer.enable_adapters(enabled)


def lora_state_dict(denoiser: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(denoiser, adapter_name=adapter_name)


def save_lora(pipe, lora_config, directory: str) -> None:
    """The policy adapter in diffusers' LoRA format (``pytorch_lora_weights.safetensors`` with the
    LoraConfig as metadata), loadable by the stock pipeline's ``load_lora_weights``."""
    attr = denoiser_attr(pipe)
    layers = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(pipe.denoiser).items()}
    type(stock_pipeline(pipe)).save_lora_weights(
        directory, **{f"{attr}_lora_layers": layers, f"{attr}_lora_adapter_metadata": lora_config.to_dict()}
    )


def load_lora(pipe, directory: str) -> None:
    """Load a :func:`save_lora` directory into the denoiser as adapter "default".

    Denoisers with diffusers' PeftAdapterMixin (UNets, SD3) use its stock ``load_lora_adapter``,
    the transformer/unet half of the pipeline's ``load_lora_weights`` (which also works on the stock
    SD/SDXL/SD3 pipelines; ShapesPipeline's fails looking for a ``text_encoder_2``). PixArt's
    transformer has no PeftAdapterMixin: the adapter is injected with peft from the same file.
    """
    attr, den = denoiser_attr(pipe), pipe.denoiser
    if hasattr(den, "load_lora_adapter"):
        den.load_lora_adapter(directory, prefix=attr, adapter_name="default", weight_name=LORA_WEIGHTS)
        return
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    state, meta = type(stock_pipeline(pipe)).lora_state_dict(directory, return_lora_metadata=True)
    state = {k[len(attr) + 1:]: v for k, v in state.items() if k.startswith(attr + ".")}
    meta = {k[len(attr) + 1:]: v for k, v in (meta or {}).items() if k.startswith(attr + ".")}
    inject_adapter_in_model(LoraConfig(**meta), pipe.denoiser, "default")
    set_peft_model_state_dict(pipe.denoiser, state, adapter_name="default")


@torch.no_grad()
def fold_lora(denoiser: torch.nn.Module) -> int:
    """Merge every LoRA layer into its base weight and put the plain base layer back (peft's
    ``merge_and_unload`` for any denoiser, with or without diffusers' PeftAdapterMixin). Returns the
    number of layers folded; afterwards the module holds no adapter and saves as a plain model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    folded = 0
    for name, module in list(denoiser.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(denoiser.get_submodule(parent_name) if parent_name else denoiser, child, module.get_base_layer())
            folded += 1
    if hasattr(denoiser, "peft_config"):
        del denoiser.peft_config
    if getattr(denoiser, "_hf_peft_config_loaded", False):
        denoiser._hf_peft_config_loaded = False
    return folded


def merge_lora_checkpoint(model_path: str, lora_dir: str, out_dir: str) -> None:
    """Save ``model_path`` with the :func:`save_lora` adapter in ``lora_dir`` folded into its weights,
    as a full diffusers pipeline: what the next stage loads as a plain generator."""
    pipe = load_model(model_path)
    load_lora(pipe, lora_dir)
    if fold_lora(pipe.denoiser) == 0:
        raise ValueError(f"{lora_dir} holds no LoRA layer for the denoiser of {model_path}")
    pipe.save_pretrained(out_dir)


def write_full_model(checkpoint_dir: str, cfg: TrainConfig, out_dir: str) -> None:
    """The model of a :func:`save_checkpoint` directory as a full diffusers pipeline at ``out_dir``,
    written atomically (``out_dir``.tmp, then rename): a LoRA checkpoint is folded into a copy of
    ``cfg.model.path``, a full one copied. What a next stage loads as a plain generator."""
    out = os.path.abspath(out_dir)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.model.lora:
        merge_lora_checkpoint(cfg.model.path, os.path.join(checkpoint_dir, LORA_DIR), tmp)
    else:
        shutil.copytree(os.path.join(checkpoint_dir, PIPELINE_DIR), tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


# ----------------------------------------------------------------------------- state


@dataclass
class TrainState:
    """Everything one worker trains: the pipeline, its reference, the optimizer and the step."""

    cfg: TrainConfig
    pipe: Any
    params: list[torch.nn.Parameter]  # trainable, in a fixed order (checkpoints rely on it)
    optimizer: torch.optim.Optimizer
    ref_module: torch.nn.Module | None = None  # full fine-tuning reference (frozen copy)
    lora_config: Any = None
    step: int = 0
    skipped_rows: int = 0
    scaler: Any = None
    device: torch.device = torch.device("cpu")

    @property
    def ref_adapter(self) -> bool:
        """LoRA with a refreshable reference adapter."""
        return self.lora_config is not None and self.cfg.loss.ref_refresh_every > 0


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. Low precision only where the device supports it."""
    if precision == "fp32" or device.type != "cuda":
        return None
    if precision in ("auto", "bf16"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else (torch.float16 if precision == "auto" else None)
    return torch.float16


def build_state(cfg: TrainConfig, pipe=None, device: torch.device | str = "cpu") -> TrainState:
    """Freeze the pipeline, add LoRA (or copy a reference for full fine-tuning), build AdamW."""
    device = torch.device(device)
    pipe = load_model(cfg.model.path, device) if pipe is None else pipe
    stock_pipeline(pipe).to(device)
    for m in [*stock_pipeline(pipe).components.values(), pipe.denoiser]:
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False)
            m.eval()  # no dropout in the frozen text encoder; LoRA dropout is set by its own layers
    den = pipe.denoiser
    lora_config, ref_module = None, None
    if cfg.model.lora:
        from peft import LoraConfig

        lora_config = LoraConfig(
            r=cfg.model.lora_rank, lora_alpha=cfg.model.lora_alpha, lora_dropout=cfg.model.lora_dropout,
            init_lora_weights="gaussian", target_modules=list(cfg.model.lora_targets),
        )
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.model.lora_seed)
            add_lora(den, lora_config, "default")
        if cfg.loss.ref_refresh_every > 0:
            add_lora(den, copy.deepcopy(lora_config), "ref")
            _copy_adapter(den, "default", "ref")
        params = [p for n, p in den.named_parameters() if ".default." in n and "lora_" in n]
        for p in params:
            p.requires_grad_(True)
    else:
        ref_module = copy.deepcopy(den).requires_grad_(False).eval()
        den.requires_grad_(True)
        params = list(den.parameters())
    den.train()
    check(len(params) > 0, f"no trainable parameters (lora_targets={cfg.model.lora_targets})")
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.adam_betas), weight_decay=o.weight_decay)
    amp = autocast_dtype(o.precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    return TrainState(cfg=cfg, pipe=pipe, params=params, optimizer=optimizer, ref_module=ref_module,
                      lora_config=lora_config, scaler=scaler, device=device)


@torch.no_grad()
def _copy_adapter(den: torch.nn.Module, src: str, dst: str) -> None:
    named = dict(den.named_parameters())
    for n, p in named.items():
        if f".{src}." in n and "lora_" in n:
            named[n.replace(f".{src}.", f".{dst}.")].copy_(p)


@torch.no_grad()
def refresh_reference(state: TrainState) -> None:
    """BalancedDPO's dynamic reference: the reference becomes a copy of the current policy."""
    if state.lora_config is not None:
        _copy_adapter(state.pipe.denoiser, "default", "ref")
    else:
        state.ref_module.load_state_dict(state.pipe.denoiser.state_dict())


def _ref_tensors(state: TrainState) -> list[torch.Tensor] | None:
    """Reference weights that differ from the loaded model (after a refresh), for checkpoints."""
    if state.cfg.loss.ref_refresh_every == 0:
        return None
    if state.lora_config is not None:
        return [p.detach().cpu().clone() for n, p in state.pipe.denoiser.named_parameters() if ".ref." in n]
    return [t.detach().cpu().clone() for t in state.ref_module.state_dict().values()]


@contextlib.contextmanager
def reference_mode(state: TrainState):
    """Inside, ``state.pipe.predict`` runs the reference model."""
    den = state.pipe.denoiser
    if state.lora_config is None:
        with use_denoiser(state.pipe, state.ref_module):
            yield
    elif state.ref_adapter:
        set_active_adapter(den, "ref")
        try:
            yield
        finally:
            set_active_adapter(den, "default")
    else:
        set_adapters_enabled(den, False)
        try:
            yield
        finally:
            set_adapters_enabled(den, True)


# ----------------------------------------------------------------------------- batches


def select(row: dict, cfg: LossSection) -> tuple[list[int], list[tuple[int, int, float]]] | None:
    """Which images of a row to forward, and the (winner, loser, weight) pairs among them.

    Indices in the pairs are positions in the returned image list. None: the row gives no
    training signal for this method (all phi tied, no consensus pairs, no image of the generator).
    """
    phi = np.asarray(row["phi"], dtype=np.float64)
    k = len(phi)
    if cfg.method == "rankdpo":
        return (list(range(k)), []) if phi.max() > phi.min() else None
    if cfg.method == "sft":
        if cfg.sft_target == "best":
            return [int(np.argmax(phi))], []
        idx = [i for i, g in enumerate(row["generators"]) if g == cfg.sft_generator]
        return (idx, []) if idx else None
    if cfg.method == "balanced":
        pairs = row["pairs"] or []
        if not pairs:
            return None
        idx = sorted({p["i"] for p in pairs} | {p["j"] for p in pairs})
        pos = {v: n for n, v in enumerate(idx)}
        out = []
        for p in pairs:
            w = 1.0
            if cfg.vote_weighting:
                total = p["votes_i"] + p["votes_j"]
                w = (p["votes_i"] - p["votes_j"]) / total if total > 0 else 0.0
            out.append((pos[p["i"]], pos[p["j"]], float(w)))
        return idx, out
    # dpo
    if phi.max() <= phi.min():
        return None
    if cfg.dpo_pairs == "best_worst":
        return [int(np.argmax(phi)), int(np.argmin(phi))], [(0, 1, 1.0)]
    return list(range(k)), [(i, j, 1.0) for i in range(k) for j in range(k) if phi[i] > phi[j]]


def _row_seed(seed: int, step: int, pid: str) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7919 + int(pid[:15], 16)) % (2**63 - 1)


def collate(rows: list[dict], state: TrainState) -> dict:
    """Rows of the preference table -> one forward batch.

    If no row is usable: ``{"n_rows": 0, "skipped": len(rows)}``. Else a dict with ``x0`` [N, C, H, W], ``noise`` like x0,
    ``t`` [N], ``cond`` (per image), ``row`` [N] (prompt index of each image), ``pairs`` [P, 3]
    long (winner, loser, prompt) and ``pair_w`` [P], ``phi`` [B, K] (rankdpo), ``n_rows`` B,
    ``skipped`` (rows without signal).
    """
    from raypref.prefdata import decode_png

    cfg, pipe = state.cfg.loss, state.pipe
    schedule = pipe.noise_schedule()
    images, row_of, prompts, pairs, pair_w, phis, noises, ts = [], [], [], [], [], [], [], []
    skipped = 0
    for row in rows:
        sel = select(row, cfg)
        if sel is None:
            skipped += 1
            continue
        idx, row_pairs = sel
        b, base = len(prompts), len(images)
        prompts.append(row["prompt"])
        images += [decode_png(row["images"][i]) for i in idx]
        row_of += [b] * len(idx)
        pairs += [(base + i, base + j, b) for i, j, _ in row_pairs]
        pair_w += [w for _, _, w in row_pairs]
        phis.append([float(v) for v in row["phi"]])
        noises.append(_row_seed(state.cfg.data.seed, state.step, row["prompt_id"]))
    if not prompts:
        return {"n_rows": 0, "skipped": skipped}
    with torch.no_grad():
        x0 = pipe.encode_images(np.stack(images)).to(state.device, torch.float32)
        row_t = torch.as_tensor(row_of, device=state.device)
        noise_rows, t_rows = [], []
        for b, s in enumerate(noises):  # one noise, t and prompt dropout per prompt, shared by its images
            g = torch.Generator().manual_seed(s)
            t_rows.append(schedule.sample_timesteps(1, generator=g))
            noise_rows.append(torch.randn(x0.shape[1:], generator=g))
            if state.cfg.data.cfg_dropout > 0 and torch.rand((), generator=g) < state.cfg.data.cfg_dropout:
                prompts[b] = ""
        noise = torch.stack(noise_rows).to(state.device)[row_t]
        t = torch.cat(t_rows).to(state.device)[row_t]
        with _autocast(state):
            cond = pipe.encode_prompts(prompts)
        cond = {k: v.detach().float()[row_t] for k, v in cond.items()}
    out = {"x0": x0, "noise": noise, "t": t, "cond": cond, "row": row_t, "n_rows": len(prompts),
           "skipped": skipped,
           "pairs": torch.as_tensor(pairs, dtype=torch.long, device=state.device).reshape(-1, 3),
           "pair_w": torch.as_tensor(pair_w, dtype=torch.float32, device=state.device)}
    if cfg.method == "rankdpo":
        ks = {len(p) for p in phis}
        if len(ks) != 1:
            raise ValueError(f"rankdpo needs the same K for every prompt of a batch, got K in {sorted(ks)}")
        out["phi"] = torch.as_tensor(phis, dtype=torch.float32, device=state.device)
    return out


def _autocast(state: TrainState):
    dtype = autocast_dtype(state.cfg.optim.precision, state.device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(state.device.type, dtype=dtype)


# ----------------------------------------------------------------------------- losses


def errors(state: TrainState, batch: dict, reference: bool = False) -> torch.Tensor:
    """Per-image denoising error [N] of the policy (with grad) or the reference (no grad)."""
    pipe = state.pipe
    schedule = pipe.noise_schedule()
    x_t = schedule.add_noise(batch["x0"], batch["noise"], batch["t"])
    target = schedule.target(batch["x0"], batch["noise"], batch["t"])
    if reference:
        with torch.no_grad(), reference_mode(state), _autocast(state):
            pred = pipe.predict(x_t, batch["t"], batch["cond"])
    else:
        with _autocast(state):
            pred = pipe.predict(x_t, batch["t"], batch["cond"])
    return per_sample_error(pred, target)


def batch_loss(state: TrainState, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(sum over prompts of per-prompt losses, metrics as local means) for one forward batch."""
    cfg = state.cfg.loss
    n_rows = batch["n_rows"]
    if cfg.method == "sft":
        err = errors(state, batch)
        per_row = torch.zeros(n_rows, device=err.device).index_add(0, batch["row"], err)
        counts = torch.zeros(n_rows, device=err.device).index_add(0, batch["row"], torch.ones_like(err))
        loss = sft_loss(per_row / counts)
        return loss.sum(), {"loss": loss.detach().mean(), "policy_err": err.detach().mean()}
    ref = errors(state, batch, reference=True)  # reference first: adapters toggled outside the graph
    err = errors(state, batch)
    if cfg.method == "rankdpo":
        b, k = batch["phi"].shape
        e, r, phi = err.view(b, k), ref.view(b, k), batch["phi"]
        loss = rank_dpo_loss(e, r, phi, cfg.beta / 2, weights=cfg.rank_weights)
        best, worst = phi.argmax(1, keepdim=True), phi.argmin(1, keepdim=True)
        m = dpo_metrics(e.gather(1, best)[:, 0], e.gather(1, worst)[:, 0], r.gather(1, best)[:, 0],
                        r.gather(1, worst)[:, 0], cfg.beta)
        m["implicit_acc"] = rank_pair_accuracy(e.detach(), r, phi)
        m["pref_loss"] = loss.detach().mean()  # "loss" less the sft_weight term
        if cfg.sft_weight > 0:
            loss = loss + cfg.sft_weight * e.gather(1, best)[:, 0]
        m["loss"] = loss.detach().mean()
        return loss.sum(), m
    w, lo, prow = batch["pairs"].unbind(1)
    fn = balanced_dpo_loss if cfg.method == "balanced" else diffusion_dpo_loss
    kwargs = {"vote_weight": batch["pair_w"]} if cfg.method == "balanced" else {}
    pair_loss = fn(err[w], err[lo], ref[w], ref[lo], cfg.beta, **kwargs)
    if cfg.method == "dpo":
        pair_loss = pair_loss * batch["pair_w"]
    # each prompt counts once: mean over its pairs
    n_pairs = torch.zeros(n_rows, device=err.device).index_add(0, prow, torch.ones_like(pair_loss))
    per_row = torch.zeros(n_rows, device=err.device).index_add(0, prow, pair_loss) / n_pairs
    m = dpo_metrics(err[w], err[lo], ref[w], ref[lo], cfg.beta)
    m["pref_loss"] = per_row.detach().mean()  # "loss" less the sft_weight term
    if cfg.sft_weight > 0:  # mean winner error over the prompt's pairs
        per_row = per_row + cfg.sft_weight * torch.zeros(n_rows, device=err.device).index_add(0, prow, err[w]) / n_pairs
    m["loss"] = per_row.detach().mean()
    return per_row.sum(), m


def lr_factor(step: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then constant (the Diffusion-DPO schedule)."""
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _world() -> tuple[int, Any]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_world_size(), dist
    return 1, None


def train_step(state: TrainState, micro_batches: list[list[dict]]) -> dict[str, float] | None:
    """One optimizer step over ``grad_accum`` micro-batches of rows (this worker's share).

    Loss = sum of per-prompt losses / prompts in the GLOBAL step; gradients summed over workers.
    Returns metrics averaged over all workers' prompts, or None when no worker had a usable row
    (no update, step not advanced). Raises FloatingPointError on a non-finite loss, before the
    optimizer step, on every worker.
    """
    world, dist = _world()
    batches = [collate(rows, state) for rows in micro_batches]
    skipped = sum(b["skipped"] for b in batches)
    n_local = sum(b["n_rows"] for b in batches)
    counts = torch.tensor([float(n_local), float(skipped)], dtype=torch.float64)
    if dist is not None:
        dist.all_reduce(counts)
    n_global = int(counts[0].item())
    state.skipped_rows += int(counts[1].item())
    if n_global == 0:
        return None
    for g in state.optimizer.param_groups:
        g["lr"] = state.cfg.optim.lr * lr_factor(state.step, state.cfg.optim.warmup_steps)
    state.optimizer.zero_grad(set_to_none=True)
    loss_total = torch.zeros((), dtype=torch.float64)
    sums: dict[str, float] = {}
    for b in batches:
        if b["n_rows"] == 0:
            continue
        loss_sum, metrics = batch_loss(state, b)
        loss = loss_sum / n_global
        loss_total += loss.detach().double().cpu()
        (state.scaler.scale(loss) if state.scaler else loss).backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * b["n_rows"]
    keys = METRIC_KEYS["sft" if state.cfg.loss.method == "sft" else "pairwise"]  # same on every worker
    stats = torch.tensor([loss_total.item()] + [sums.get(k, 0.0) for k in keys], dtype=torch.float64)
    if dist is not None:
        dist.all_reduce(stats)
    if not math.isfinite(stats[0].item()):
        raise FloatingPointError(
            f"non-finite loss {stats[0].item()} at step {state.step + 1}; stopping before the optimizer step, "
            f"no checkpoint written for this step")
    if dist is not None:
        for p in state.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
    if state.scaler:
        state.scaler.unscale_(state.optimizer)
    gnorm = torch.nn.utils.clip_grad_norm_(
        state.params, state.cfg.optim.grad_clip if state.cfg.optim.grad_clip > 0 else float("inf"))
    if state.scaler:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.step += 1
    every = state.cfg.loss.ref_refresh_every
    if every and state.step % every == 0:
        refresh_reference(state)
    out = {"step": state.step, "loss": stats[0].item(), "grad_norm": float(gnorm),
           "lr": state.optimizer.param_groups[0]["lr"], "prompts": n_global, "skipped_rows": state.skipped_rows}
    out.update({k: v / n_global for k, v in zip(keys, stats[1:].tolist()) if k != "loss"})
    return out


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(state: TrainState, directory: str) -> None:
    """Resume state (``train_state.pt``) plus the model: LoRA weights (``lora/``) or the full
    pipeline in diffusers format (``pipeline/``)."""
    os.makedirs(directory, exist_ok=True)
    torch.save({"step": state.step, "skipped_rows": state.skipped_rows,
                "params": [p.detach().cpu() for p in state.params], "ref": _ref_tensors(state),
                "optim": state.optimizer.state_dict()}, os.path.join(directory, TRAIN_STATE))
    export_model(state, directory)


def export_model(state: TrainState, directory: str) -> None:
    if state.lora_config is not None:
        save_lora(state.pipe, state.lora_config, os.path.join(directory, LORA_DIR))
    else:
        state.pipe.save_pretrained(os.path.join(directory, PIPELINE_DIR))


@torch.no_grad()
def load_checkpoint(state: TrainState, directory: str) -> None:
    s = torch.load(os.path.join(directory, TRAIN_STATE), map_location=state.device, weights_only=False)
    if len(s["params"]) != len(state.params):
        raise ValueError(f"checkpoint {directory} has {len(s['params'])} trainable tensors, model {len(state.params)}")
    for p, v in zip(state.params, s["params"]):
        p.copy_(v)
    if s["ref"] is not None:
        if state.lora_config is not None:
            refs = [p for n, p in state.pipe.denoiser.named_parameters() if ".ref." in n]
        else:
            refs = list(state.ref_module.state_dict().values())
        for p, v in zip(refs, s["ref"]):
            p.copy_(v)
    state.optimizer.load_state_dict(s["optim"])
    state.step, state.skipped_rows = s["step"], s["skipped_rows"]


# ----------------------------------------------------------------------------- the loop


def micro_batches(rows_iter: Iterable[list[dict]], grad_accum: int) -> Iterable[list[list[dict]]]:
    """Group micro-batches of rows into optimizer steps of ``grad_accum`` micro-batches."""
    group = []
    for rows in rows_iter:
        group.append(rows)
        if len(group) == grad_accum:
            yield group
            group = []


def run_loop(state: TrainState, epoch_rows: Callable[[], Iterable[list[dict]]],
             report: Callable[[dict, str | None], None], rank: int = 0) -> None:
    """Train until ``optim.max_steps``. ``epoch_rows()`` yields one epoch of micro-batches (lists of
    row dicts); ``report(metrics, checkpoint_dir_or_None)`` is called by every worker (only rank 0
    passes a directory). A directory is only valid during the call."""
    cfg = state.cfg
    started = time.time()
    while state.step < cfg.optim.max_steps:
        stepped = False
        for group in micro_batches(epoch_rows(), cfg.optim.grad_accum):
            metrics = train_step(state, group)
            if metrics is None:
                continue
            stepped = True
            metrics["elapsed_s"] = time.time() - started
            last = state.step >= cfg.optim.max_steps
            if state.step % cfg.run.checkpoint_every == 0 or last:
                if rank == 0:
                    with tempfile.TemporaryDirectory() as d:
                        save_checkpoint(state, d)
                        report(metrics, d)
                else:
                    report(metrics, None)
            elif state.step % cfg.run.log_every == 0:
                report(metrics, None)
            if last:
                break
        if not stepped:
            raise ValueError(f"an epoch of {cfg.data.path} gave no usable row for method {cfg.loss.method!r} "
                             f"({state.skipped_rows} rows skipped)")


def cached_epochs(read_epoch: Callable[[], Iterable[list[dict]]]) -> Callable[[], Iterator[list[dict]]]:
    """``read_epoch`` (one pass over the data, e.g. a Ray Data shard) read once, then replayed from
    memory in the same order. An epoch abandoned part-way (training stopped) is not replayed: the next
    call reads again, so a replay is always a complete epoch."""
    cached: list[list[dict]] = []
    complete = False

    def epochs():
        nonlocal complete
        if complete:
            yield from cached
            return
        cached.clear()
        for rows in read_epoch():
            cached.append(rows)
            yield rows
        complete = True

    return epochs


def _rows(batch) -> list[dict]:
    return batch.to_pylist()


def train_func(config: dict) -> None:
    """Ray Train worker loop. ``config``: {"cfg": TrainConfig}."""
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = config["cfg"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, int(cfg.run.cpus_per_worker)))
    device = ray.train.torch.get_device() if cfg.run.use_gpu else torch.device("cpu")
    state = build_state(cfg, device=device)
    world, dist = _world()
    if dist is not None:  # what DDP does at wrap time: every worker starts from rank 0's weights
        with torch.no_grad():
            for p in state.params:
                dist.broadcast(p.data, src=0)
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            load_checkpoint(state, d)
    shard = ray.train.get_dataset_shard("train")

    def read_epoch():
        for batch in shard.iter_batches(batch_size=cfg.micro_batch_size, batch_format="pyarrow", drop_last=True):
            yield _rows(batch)

    epoch_rows = cached_epochs(read_epoch) if cfg.data.cache_shard else read_epoch

    def report(metrics, directory):
        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=checkpoint)

    run_loop(state, epoch_rows, report, rank)
    if rank == 0 and cfg.run.export_dir:
        export_model(state, os.path.expanduser(cfg.run.export_dir))


# ----------------------------------------------------------------------------- held-out evaluation


@torch.no_grad()
def heldout_accuracy(state: TrainState, rows: list[dict], n_draws: int = 4, seed: int = 1234,
                     pairs: str = "best_worst", batch_size: int = 16) -> dict[str, float]:
    """Implicit reward accuracy of the policy vs its reference on held-out pairs.

    A pair (w, l) is correct when ``err_w - ref_err_w < err_l - ref_err_l``, with errors averaged
    over ``n_draws`` shared (noise, t) draws per prompt. ``pairs``: "best_worst" by phi, or
    "consensus" (the rows' BalancedDPO pairs). Returns accuracy, mean margin (paper beta of
    ``state.cfg.loss``) and the number of pairs.
    """
    if pairs not in ("best_worst", "consensus"):
        raise ValueError(f"pairs must be best_worst|consensus, got {pairs!r}")
    loss_cfg = LossSection(method="dpo" if pairs == "best_worst" else "balanced", beta=state.cfg.loss.beta)
    eval_state = copy.copy(state)
    eval_state.cfg = TrainConfig(model=state.cfg.model, data=DataSection(path=state.cfg.data.path, seed=seed),
                                 loss=loss_cfg, optim=state.cfg.optim, run=state.cfg.run)
    den = state.pipe.denoiser
    was_training = den.training
    den.eval()
    d_w, d_l = [], []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            acc_w = acc_l = None
            for draw in range(n_draws):
                eval_state.step = draw  # the draw index keys the noise
                b = collate(chunk, eval_state)
                if b["n_rows"] == 0:
                    break
                ref, err = errors(eval_state, b, reference=True), errors(eval_state, b)
                w, lo, _ = b["pairs"].unbind(1)
                dw, dl = err[w] - ref[w], err[lo] - ref[lo]
                acc_w = dw if acc_w is None else acc_w + dw
                acc_l = dl if acc_l is None else acc_l + dl
            if acc_w is not None:
                d_w.append(acc_w / n_draws)
                d_l.append(acc_l / n_draws)
    finally:
        den.train(was_training)
    if not d_w:
        return {"accuracy": float("nan"), "margin": float("nan"), "pairs": 0}
    dw, dl = torch.cat(d_w), torch.cat(d_l)
    return {"accuracy": (dw < dl).float().mean().item(),
            "margin": (-0.5 * state.cfg.loss.beta * (dw - dl)).mean().item(), "pairs": int(dw.numel())}
