"""Noise schedules for the three prediction types raypref trains: forward noising, training targets,
x0 estimates and the per-sample denoising error that every DPO-family loss consumes.

Prediction types:
  - "epsilon"      (SD1.5, SDXL, PixArt):   x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps,  target = eps
  - "v_prediction" (SD2.x):                  same x_t,  target = sqrt(a_t) eps - sqrt(1 - a_t) x0
  - "flow"         (SD3, FLUX; rectified flow, diffusers FlowMatchEulerDiscreteScheduler convention):
                    sigma = t / T,  x_t = (1 - sigma) x0 + sigma eps,  target (velocity) = eps - x0
where a_t = alphas_cumprod[t] exactly as diffusers' DDPMScheduler computes it.

Only torch is needed to import this module; diffusers is imported lazily by `NoiseSchedule.from_scheduler`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")
BETA_SCHEDULES = ("linear", "scaled_linear")

# diffusers' scheduler prediction_type strings that mean our "flow" (DPMSolver/UniPC with flow sigmas).
_FLOW_PREDICTION_ALIASES = ("flow", "flow_prediction")


@functools.lru_cache(maxsize=16)
def _alphas_cumprod_cpu(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> Tensor:
    # Same ops, same float32 dtype as diffusers DDPMScheduler.__init__, so the result is bit-identical.
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:  # scaled_linear (latent diffusion)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _expand_like(coef: Tensor, x: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] with x.ndim dims, so it broadcasts over [B, C, H, W] or [B, C, F, H, W]."""
    return coef.reshape(coef.shape[0], *([1] * (x.ndim - 1)))


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Coefficients in at least fp32: bf16 sqrt(alphas_cumprod) would lose ~3 digits near t=0.
    return torch.promote_types(x.dtype, torch.float32)


@dataclass(frozen=True)
class NoiseSchedule:
    """Forward process and training target for one prediction type. Pure tensor functions; no state."""

    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085  # DDPM families, as diffusers DDPMScheduler
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # "linear" | "scaled_linear"
    logit_mean: float = 0.0  # flow: logit-normal timestep sampling (SD3 paper)
    logit_std: float = 1.0
    shift: float = 1.0  # flow: SD3 timestep shift sigma' = shift*s / (1 + (shift-1)*s)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; expected one of {BETA_SCHEDULES}")
        T = self.num_train_timesteps
        if isinstance(T, bool) or not isinstance(T, int) or T < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {T!r}")
        for name in ("beta_start", "beta_end", "logit_mean", "logit_std", "shift"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not (0.0 < self.beta_start <= self.beta_end < 1.0):
            raise ValueError(
                f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start!r}, beta_end={self.beta_end!r}"
            )
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std!r}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_scheduler(cls, scheduler: Any) -> "NoiseSchedule":
        """From a diffusers scheduler instance or its config (FrozenDict / dict, optionally with `_class_name`).

        DDPM/DDIM/Euler/DPMSolver/... (any config with betas) -> "epsilon" or "v_prediction" from
        config.prediction_type, with its beta settings. FlowMatch*Scheduler -> "flow" with its `shift`
        (with `use_dynamic_shifting`, as FLUX, the training sigmas are unshifted, so shift=1, matching
        diffusers' FLUX training scripts). DPMSolver/UniPC with `use_flow_sigmas` -> "flow" with `flow_shift`.
        Anything else (trained_betas, zero-SNR rescale, cosine/sigmoid betas, "sample" prediction, ...)
        -> ValueError.
        """
        if isinstance(scheduler, Mapping):
            config, class_name = scheduler, str(scheduler.get("_class_name", ""))
        elif isinstance(getattr(scheduler, "config", None), Mapping):
            config, class_name = scheduler.config, type(scheduler).__name__
        else:
            raise ValueError(f"expected a diffusers scheduler or its config, got {type(scheduler).__name__}")

        T = int(config.get("num_train_timesteps", 1000))
        is_flow_matching = class_name.startswith("FlowMatch") or (
            not class_name and "shift" in config and "beta_start" not in config
        )
        if is_flow_matching:
            if config.get("invert_sigmas", False):
                raise ValueError(f"unsupported scheduler {class_name or 'config'}: invert_sigmas=True")
            shift = 1.0 if config.get("use_dynamic_shifting", False) else float(config.get("shift", 1.0))
            return cls(prediction_type="flow", num_train_timesteps=T, shift=shift)

        if "beta_start" not in config or "prediction_type" not in config:
            raise ValueError(f"unsupported scheduler {class_name or 'config'}: no beta schedule / prediction_type")
        prediction_type = config["prediction_type"]
        if config.get("use_flow_sigmas", False) or prediction_type in _FLOW_PREDICTION_ALIASES:
            if not config.get("use_flow_sigmas", False):
                raise ValueError(f"unsupported scheduler {class_name}: flow prediction without use_flow_sigmas")
            return cls(prediction_type="flow", num_train_timesteps=T, shift=float(config.get("flow_shift", 1.0)))
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r} in scheduler {class_name or 'config'}")
        if config.get("trained_betas") is not None:
            raise ValueError(f"unsupported scheduler {class_name or 'config'}: trained_betas")
        if config.get("rescale_betas_zero_snr", False):
            raise ValueError(f"unsupported scheduler {class_name or 'config'}: rescale_betas_zero_snr=True")
        beta_schedule = config.get("beta_schedule", "linear")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unsupported beta_schedule {beta_schedule!r} in scheduler {class_name or 'config'}")
        return cls(
            prediction_type=prediction_type,
            num_train_timesteps=T,
            beta_start=float(config["beta_start"]),
            beta_end=float(config.get("beta_end", 0.02)),
            beta_schedule=beta_schedule,
        )

    # ------------------------------------------------------------------ schedule
    def alphas_cumprod(self) -> Tensor:
        """[T] float32, identical to diffusers DDPMScheduler(...).alphas_cumprod (meaningless for flow)."""
        return _alphas_cumprod_cpu(
            self.num_train_timesteps, float(self.beta_start), float(self.beta_end), self.beta_schedule
        ).clone()

    def sample_timesteps(
        self, batch_size: int, *, generator: torch.Generator | None = None, device: Any = None
    ) -> Tensor:
        """[B] training timesteps.

        DDPM families: int64 uniform in [0, T). Flow: float32 in (0, T), t = sigma * T with
        sigma = sigmoid(N(logit_mean, logit_std)) then SD3-shifted; this is the `timestep` diffusers'
        SD3/FLUX transformers take (FLUX pipelines divide by 1000 themselves). Drawn on the generator's
        device (CPU if none) and moved to `device`, so a seeded CPU generator is reproducible anywhere.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        draw_device = generator.device if generator is not None else torch.device("cpu")
        T = self.num_train_timesteps
        if self.prediction_type != "flow":
            t = torch.randint(0, T, (batch_size,), generator=generator, device=draw_device, dtype=torch.int64)
            return t.to(device) if device is not None else t
        z = torch.randn(batch_size, generator=generator, device=draw_device, dtype=torch.float64)
        sigma = torch.sigmoid(self.logit_mean + self.logit_std * z)
        sigma = self.shift * sigma / (1.0 + (self.shift - 1.0) * sigma)
        t = (sigma * T).to(torch.float32)
        # Keep the open interval (0, T) even when sigmoid saturates in float32.
        lo = torch.nextafter(torch.tensor(0.0), torch.tensor(1.0))
        hi = torch.nextafter(torch.tensor(float(T)), torch.tensor(0.0))
        t = t.clamp(min=lo.item(), max=hi.item())
        return t.to(device) if device is not None else t

    # ------------------------------------------------------------------ per-t coefficients
    def _check(self, x: Tensor, other: Tensor, t: Tensor, names: tuple[str, str]) -> None:
        if not isinstance(x, Tensor) or not isinstance(other, Tensor) or not isinstance(t, Tensor):
            raise ValueError(f"{names[0]}, {names[1]} and t must be tensors")
        if x.shape != other.shape:
            raise ValueError(f"{names[0]} shape {tuple(x.shape)} != {names[1]} shape {tuple(other.shape)}")
        if x.ndim < 2:
            raise ValueError(f"{names[0]} must be [B, ...] with at least 2 dims, got shape {tuple(x.shape)}")
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape [B]=[{x.shape[0]}], got {tuple(t.shape)}")
        T = self.num_train_timesteps
        if self.prediction_type == "flow":
            if t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"t has unsupported dtype {t.dtype}")
            if bool(((t < 0) | (t > T) | ~torch.isfinite(t.to(torch.float64))).any()):
                raise ValueError(f"flow t must lie in [0, {T}], got min={t.min().item()} max={t.max().item()}")
        else:
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"{self.prediction_type} t must be an integer tensor, got dtype {t.dtype}")
            if bool(((t < 0) | (t >= T)).any()):
                raise ValueError(f"t must lie in [0, {T}), got min={t.min().item()} max={t.max().item()}")

    def _sqrt_alphas(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(a_t), sqrt(1 - a_t)), each [B, 1, ...] in the compute dtype on x's device."""
        a = self.alphas_cumprod().to(device=x.device, dtype=_compute_dtype(x))[t.to(x.device)]
        return _expand_like(a.sqrt(), x), _expand_like((1.0 - a).sqrt(), x)

    def _sigma(self, t: Tensor, x: Tensor) -> Tensor:
        """sigma = t / T as [B, 1, ...] in the compute dtype on x's device."""
        return _expand_like(t.to(device=x.device, dtype=_compute_dtype(x)) / self.num_train_timesteps, x)

    # ------------------------------------------------------------------ forward process / targets
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t [B, ...] (dtype of x0) from clean x0 [B, ...], noise like x0 and timesteps t [B]."""
        self._check(x0, noise, t, ("x0", "noise"))
        if self.prediction_type == "flow":
            sigma = self._sigma(t, x0)
            x_t = sigma * noise + (1.0 - sigma) * x0  # same expression as diffusers scale_noise
        else:
            sa, s1a = self._sqrt_alphas(t, x0)
            x_t = sa * x0 + s1a * noise
        return x_t.to(x0.dtype)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Training target [B, ...] (dtype of x0): epsilon -> noise; v -> sqrt(a) noise - sqrt(1-a) x0;
        flow -> noise - x0."""
        self._check(x0, noise, t, ("x0", "noise"))
        if self.prediction_type == "epsilon":
            return noise.to(x0.dtype)
        if self.prediction_type == "flow":
            return (noise - x0).to(x0.dtype)
        sa, s1a = self._sqrt_alphas(t, x0)
        return (sa * noise - s1a * x0).to(x0.dtype)

    def predict_x0(self, x_t: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        """x0 estimate [B, ...] (dtype of x_t) from noisy x_t and a model prediction of `target`.

        Epsilon divides by sqrt(a_t), which is ~0.07 at t=T-1 for SD1.5, so late-t estimates are noisy.
        """
        self._check(x_t, pred, t, ("x_t", "pred"))
        if self.prediction_type == "flow":
            x0 = x_t - self._sigma(t, x_t) * pred
        else:
            sa, s1a = self._sqrt_alphas(t, x_t)
            x0 = (x_t - s1a * pred) / sa if self.prediction_type == "epsilon" else sa * x_t - s1a * pred
        return x0.to(x_t.dtype)


def per_sample_error(pred: Tensor, target: Tensor) -> Tensor:
    """[B] float32 mean squared error over all non-batch dims of pred/target [B, ...], computed in float32
    whatever the input dtype (bf16 squared errors summed over 16k latents would lose the DPO signal)."""
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise ValueError("pred and target must be tensors")
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if pred.ndim < 1 or pred.shape[0] == 0 or pred[0].numel() == 0:
        raise ValueError(f"pred must be [B, ...] with B >= 1 and a non-empty sample, got shape {tuple(pred.shape)}")
    if not pred.is_floating_point() or not target.is_floating_point():
        raise ValueError(f"pred and target must be floating point, got {pred.dtype} and {target.dtype}")
    diff = pred.to(torch.float32) - target.to(torch.float32)
    return diff.square().reshape(pred.shape[0], -1).mean(dim=1)
