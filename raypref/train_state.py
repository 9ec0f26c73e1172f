"""What one preference-training worker holds (``TrainState``: the pipeline, its reference, the optimizer,
the step), how it is built from a config, how the reference model is reached, and its checkpoints.

Reference model: LoRA -> the same network with adapters disabled (one copy of the weights); full
fine-tuning -> a frozen deep copy of the denoiser, swapped into the pipeline for the reference
forward. BalancedDPO's reference refresh (``loss.ref_refresh_every``): full -> copy the policy weights
into the frozen copy; LoRA -> a second, frozen adapter ``"ref"`` that receives a copy of the policy
adapter (merge-free: the base weights are never touched, and the reference forward activates
``"ref"`` instead of disabling adapters).
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch

from raypref.checkpoints import load_model
from raypref.config import check
from raypref.lora import (
    add_lora,
    merge_lora_checkpoint,
    save_lora,
    set_active_adapter,
    set_adapters_enabled,
    stock_pipeline,
    use_denoiser,
)
from raypref.train_config import TrainConfig

TRAIN_STATE = "train_state.pt"
LORA_DIR = "lora"
PIPELINE_DIR = "pipeline"


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
    phase_seconds: dict | None = None  # set to {} to have each step's phases timed into it (benchmarks)
    latents: dict = field(default_factory=dict)  # image digest -> x0 on CPU (data.cache=latents)

    @property
    def ref_adapter(self) -> bool:
        """LoRA with a refreshable reference adapter."""
        return self.lora_config is not None and self.cfg.loss.ref_refresh_every > 0


@contextlib.contextmanager
def phase(state: TrainState, name: str):
    """Add the block's wall time to ``state.phase_seconds[name]`` when timing is on (else free)."""
    if state.phase_seconds is None:
        yield
        return
    import time

    if state.device.type == "cuda":
        torch.cuda.synchronize(state.device)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if state.device.type == "cuda":
            torch.cuda.synchronize(state.device)
        state.phase_seconds[name] = state.phase_seconds.get(name, 0.0) + time.perf_counter() - t0


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
    if cfg.loss.t_logit_mean is not None:  # a logit-normal over sigma means nothing for DDPM timesteps
        kind = pipe.noise_schedule().prediction_type
        check(kind == "flow", f"loss.t_logit_mean is for flow-matching models; {cfg.model.path} predicts {kind!r}")
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


def autocast(state: TrainState):
    """The autocast context of the state's precision and device (a no-op on CPU fp32)."""
    dtype = autocast_dtype(state.cfg.optim.precision, state.device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(state.device.type, dtype=dtype)
