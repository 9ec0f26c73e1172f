"""Pretraining the shapes base model on clean teacher renders: two explicit loops for Ray Train.

Stage 1, ``vae_loop``: an ``AutoencoderKL`` learns to reconstruct the renders (MSE + L1 with object
edges weighted up, a tiny KL term); its ``scaling_factor`` is set so scaled latents have unit std.
Stage 2, ``denoiser_loop``: the pool is encoded once with that VAE (posterior means), then a
``UNet2DConditionModel`` and the text encoder learn flow matching on the latents, with EMA weights
for sampling. Each loop is the ``train_loop_per_worker`` of a ``TorchTrainer``: every worker renders
its own shard, gradients are averaged over workers (gloo on CPU, nccl on GPU), and metrics plus a
checkpoint are reported. Re-running with the same ``RunConfig(name, storage_path)`` resumes from
the latest checkpoint (Ray Train V2); ``jobs/pretrain_shapes.py`` runs both stages.
"""

from __future__ import annotations

import math
import os
import tempfile
import time

import torch

from raypref.pretrain_config import PretrainConfig
from raypref.raytrain import worker_threads
from raypref.shapes.autoencoder import edge_weights, latent_scaling_factor, reconstruction_eval
from raypref.shapes.teachers import render_pool
from raypref.shapes.grammar import eval_prompts


# ---------------------------------------------------------------------------------------------- data
def _worker_pool(cfg: PretrainConfig, rank: int, world: int, size_range):
    from raypref.shapes.model import model_size

    res = model_size(cfg.model.size).resolution
    return render_pool(cfg.data.teacher, cfg.data.pool_size // world, res, size_range, cfg.data.seed * 1000 + rank)


# ---------------------------------------------------------------------------------------------- shared loop parts
def lr_factor(step: int, progress: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` as progress -> 1."""
    if step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class _Clock:
    """Training progress by steps and wall time (a resumed run keeps its elapsed time)."""

    def __init__(self, max_steps: int, max_minutes: float, elapsed: float = 0.0):
        self.max_steps, self.budget, self.started = max_steps, max_minutes * 60, time.time() - elapsed

    @property
    def elapsed(self) -> float:
        return time.time() - self.started

    def progress(self, step: int) -> float:
        return max(step / self.max_steps, self.elapsed / self.budget if self.budget else 0.0)

    def done(self, step: int) -> bool:
        return step >= self.max_steps or bool(self.budget and self.elapsed >= self.budget)


def _update(opt, params, loss, world: int, grad_clip: float) -> float:
    """Backward, average gradients over workers (as DDP does), clip, step; returns the grad norm."""
    import torch.distributed as dist

    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()}; no checkpoint written")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if world > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return float(gnorm)


def _restore(params, opt, ema=None) -> dict:
    """Load the latest Ray Train checkpoint's train_state.pt into params / opt / ema; {} when none."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return {}
    with ckpt.as_directory() as d:
        state = torch.load(os.path.join(d, "train_state.pt"), map_location="cpu", weights_only=False)
    for p, v in zip(params, state["params"]):
        p.data.copy_(v)
    for e, v in zip(ema or [], state.get("ema", [])):
        e.copy_(v)
    opt.load_state_dict(state["optim"])
    return state


def _report(metrics: dict, rank: int, state: dict | None = None, save=None) -> None:
    """Report metrics; with ``state``, rank 0 also writes train_state.pt and ``save(dir)``'s files
    as the checkpoint (every worker reports, only rank 0 carries the checkpoint)."""
    import ray.train

    if state is None or rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, os.path.join(d, "train_state.pt"))
        save(d)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _setup_worker(cfg: PretrainConfig):
    import ray.train

    ctx = ray.train.get_context()
    torch.set_num_threads(worker_threads(cfg.run))
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


# ---------------------------------------------------------------------------------------------- stage 1: VAE
def vae_loop(config: dict) -> None:
    """Ray Train worker loop of stage 1. ``config``: {"cfg": PretrainConfig, "phase": "autoencoder"
    (a new VAE on ``vae.size_range``) or "decoder" (the decoder of the VAE at ``config["init"]`` on
    ``data.size_range``, encoder frozen)}."""
    from diffusers import AutoencoderKL

    from raypref.models import images_to_pixels
    from raypref.shapes.model import build_vae

    cfg: PretrainConfig = config["cfg"]
    v = cfg.vae
    decoder_only = config.get("phase", "autoencoder") == "decoder"
    rank, world, device = _setup_worker(cfg)
    if decoder_only:
        vae = AutoencoderKL.from_pretrained(config["init"]).to(device)
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
        params = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    else:
        vae = build_vae(cfg.model.size, seed=cfg.model.init_seed).to(device)
        params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=v.lr)
    state = _restore(params, opt)
    step, loss_avg = state.get("step", 0), state.get("loss_avg")

    _, images = _worker_pool(cfg, rank, world, cfg.data.size_range if decoder_only else v.size_range)
    pixels = images_to_pixels(images)
    minutes = v.decoder_minutes if decoder_only else v.max_minutes
    clock = _Clock(v.max_steps, minutes, state.get("elapsed", 0.0))  # training time, not rendering
    gen = torch.Generator().manual_seed(cfg.data.seed * 7919 + rank * 104729 + step)  # fresh stream on resume
    local_bs = v.batch_size // world
    noise = 0.0
    if decoder_only and v.decoder_latent_noise > 0:
        with torch.no_grad():
            noise = v.decoder_latent_noise * vae.encode(pixels[:512].to(device)).latent_dist.mean.std().item()

    def save(d):
        if not decoder_only:  # the decoder phase keeps the encoder, so the latent scaling stays valid
            vae.register_to_config(scaling_factor=latent_scaling_factor(vae, pixels[:2048]))
        vae.save_pretrained(os.path.join(d, "vae"))

    while not clock.done(step):
        for g in opt.param_groups:
            g["lr"] = v.lr * lr_factor(step, clock.progress(step), v.warmup_steps, 0.05)
        x = pixels[torch.randint(len(pixels), (local_bs,), generator=gen)].to(device)
        posterior = vae.encode(x).latent_dist
        # the decoder phase decodes posterior means, as generation and preference training produce them
        z = posterior.mean if decoder_only else posterior.sample(generator=None)
        if noise:  # every other image: up to `noise` of Gaussian noise; the rest keep exact latents crisp
            scale = torch.rand(len(z), 1, 1, 1, generator=gen) * noise * (torch.arange(len(z)) % 2).view(-1, 1, 1, 1)
            z = z + scale.to(device) * torch.randn(z.shape, generator=gen).to(device)
        recon = vae.decode(z).sample
        w = edge_weights(x, v.edge_weight)
        err = recon - x
        loss = (w * (err**2 + err.abs())).mean() + v.kl_weight * posterior.kl().sum() / len(x)
        gnorm = _update(opt, params, loss, world, 1.0)
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.9 * loss_avg + 0.1 * loss.item()

        metrics = {
            "stage": "vae-decoder" if decoder_only else "vae",
            "step": step,
            "loss": loss.item(),
            "loss_avg": loss_avg,
            "grad_norm": gnorm,
            "lr": opt.param_groups[0]["lr"],
            "elapsed_s": clock.elapsed,
            "resumed_from_step": state.get("step", 0),
        }
        last = clock.done(step)
        if last and v.eval_per_category and rank == 0:
            result = reconstruction_eval(vae, v.eval_per_category, cfg.data.size_range)
            metrics["recon_shapes_eval"] = result["overall"]
            metrics.update({f"recon_{c}": s for c, s in result["categories"].items()})
        if step % cfg.run.checkpoint_every == 0 or last:
            ckpt = {"params": [p.detach().cpu() for p in params], "optim": opt.state_dict(), "step": step,
                    "elapsed": clock.elapsed, "loss_avg": loss_avg}
            _report(metrics, rank, ckpt, save)
        elif step % 10 == 0:
            _report(metrics, rank)


# ---------------------------------------------------------------------------------------------- stage 2: denoiser
def quick_eval(pipe, n_per_category: int, seed: int = 1234, steps: int = 30, guidance: float = 3.0) -> dict:
    """ShapesEval of a shapes pipeline on a small fixed prompt set, through the SD1.5 adapter."""
    from raypref.models import SD15Adapter
    from raypref.shapes.detect import shapes_eval

    prompts = [p for _, p in eval_prompts(n_per_category, seed)]
    images = SD15Adapter(pipe).generate(prompts, list(range(len(prompts))), num_inference_steps=steps,
                                        guidance_scale=guidance)
    return shapes_eval(prompts, list(images))


class _swapped:
    """Context manager: parameters temporarily hold the EMA weights (for sampling and export)."""

    def __init__(self, params, ema):
        self.params, self.ema = params, ema

    def __enter__(self):
        self.saved = [p.detach().clone() for p in self.params]
        for p, e in zip(self.params, self.ema):
            p.data.copy_(e)

    def __exit__(self, *exc):
        for p, s in zip(self.params, self.saved):
            p.data.copy_(s)


def denoiser_loop(config: dict) -> None:
    """Ray Train worker loop of stage 2. ``config``: {"cfg": PretrainConfig, "vae_path": str}."""
    from diffusers import AutoencoderKL

    from raypref.diffusion import NoiseSchedule
    from raypref.models import images_to_pixels, vae_encode
    from raypref.shapes.model import build_pipeline, encode_text

    cfg: PretrainConfig = config["cfg"]
    o = cfg.optim
    rank, world, device = _setup_worker(cfg)
    vae = AutoencoderKL.from_pretrained(config["vae_path"])
    pipe = build_pipeline(cfg.model.size, seed=cfg.model.init_seed, vae=vae).to(device)
    pipe.set_progress_bar_config(disable=True)
    vae.requires_grad_(False)
    if cfg.model.init_from:  # continued training: a checkpoint of this run, if any, overrides it below
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        src = os.path.expanduser(cfg.model.init_from)
        pipe.unet.load_state_dict(UNet2DConditionModel.from_pretrained(src, subfolder="unet").state_dict())
        pipe.text_encoder.load_state_dict(CLIPTextModel.from_pretrained(src, subfolder="text_encoder").state_dict())
    params = [p for m in (pipe.unet, pipe.text_encoder) for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    state = _restore(params, opt, ema)
    step, loss_avg = state.get("step", 0), state.get("loss_avg")

    prompts, images = _worker_pool(cfg, rank, world, cfg.data.size_range)
    pixels = images_to_pixels(images)
    x_pool = torch.cat([vae_encode(vae, pixels[i:i + 512]) for i in range(0, len(pixels), 512)]).cpu()
    clock = _Clock(o.max_steps, o.max_minutes, state.get("elapsed", 0.0))  # training time, not data preparation
    schedule = NoiseSchedule(prediction_type="flow")
    gen = torch.Generator().manual_seed(cfg.data.seed * 7919 + rank * 104729 + step)  # fresh stream on resume
    local_bs = o.batch_size // world

    def save(d):
        with _swapped(params, ema):
            pipe.save_pretrained(os.path.join(d, "pipeline"))

    while not clock.done(step):
        for g in opt.param_groups:
            g["lr"] = o.lr * lr_factor(step, clock.progress(step), o.warmup_steps, o.min_lr_ratio)
        idx = torch.randint(len(prompts), (local_bs,), generator=gen)
        x0 = x_pool[idx].to(device)
        batch_prompts = ["" if torch.rand((), generator=gen) < cfg.data.cfg_dropout else prompts[i]
                         for i in idx.tolist()]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = schedule.sample_timesteps(local_bs, generator=gen).to(device)
        pred = pipe.unet(schedule.add_noise(x0, noise, t), t, encoder_hidden_states=encode_text(pipe, batch_prompts),
                         return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), schedule.target(x0, noise, t).float())
        gnorm = _update(opt, params, loss, world, o.grad_clip)
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.9 * loss_avg + 0.1 * loss.item()
        decay = min(o.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)

        metrics = {"stage": "denoiser", "step": step, "loss": loss.item(), "loss_avg": loss_avg, "grad_norm": gnorm,
                   "lr": opt.param_groups[0]["lr"], "elapsed_s": clock.elapsed,
                   "resumed_from_step": state.get("step", 0)}
        last = clock.done(step)
        if cfg.eval.every and (step % cfg.eval.every == 0 or last) and rank == 0:
            with _swapped(params, ema):
                result = quick_eval(pipe, cfg.eval.per_category)
            metrics["shapes_eval"] = result["overall"]
            metrics.update({f"eval_{c}": s for c, s in result["categories"].items()})
            metrics.update({f"drawn_{s}": f for s, f in result["shapes"].items()})
        if step % cfg.run.checkpoint_every == 0 or last:
            ckpt = {"params": [p.detach().cpu() for p in params], "ema": [e.cpu() for e in ema],
                    "optim": opt.state_dict(), "step": step, "elapsed": clock.elapsed, "loss_avg": loss_avg}
            _report(metrics, rank, ckpt, save)
        elif step % 10 == 0:
            _report(metrics, rank)

    if rank == 0 and cfg.run.export_dir:
        with _swapped(params, ema):
            pipe.save_pretrained(os.path.expanduser(cfg.run.export_dir))


# ---------------------------------------------------------------------------------------------- both stages
def vae_trainer(cfg: PretrainConfig, decoder_of: str | None = None):
    """Stage 1's TorchTrainer: a new VAE (run name ``{run.name}-vae``) or, with ``decoder_of``, the
    decoder phase of the VAE at that path (``{run.name}-vae-decoder``)."""
    from dataclasses import replace

    from raypref.raytrain import torch_trainer

    if decoder_of is None:
        return torch_trainer(
            vae_loop, {"cfg": cfg, "phase": "autoencoder"}, replace(cfg.run, name=f"{cfg.run.name}-vae")
        )
    return torch_trainer(vae_loop, {"cfg": cfg, "phase": "decoder", "init": str(decoder_of)},
                         replace(cfg.run, name=f"{cfg.run.name}-vae-decoder"))


def denoiser_trainer(cfg: PretrainConfig, vae_path: str):
    """Stage 2's TorchTrainer (run name ``{run.name}-unet``) on the trained VAE at ``vae_path``."""
    from dataclasses import replace

    from raypref.raytrain import torch_trainer

    return torch_trainer(denoiser_loop, {"cfg": cfg, "vae_path": str(vae_path)},
                         replace(cfg.run, name=f"{cfg.run.name}-unet"))


def _fit(trainer):
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def pretrain(cfg: PretrainConfig) -> dict:
    """Stage 1 (a new VAE, then its decoder phase; skipped when ``vae.path`` is set) and stage 2;
    -> metrics and checkpoint paths of each."""
    out = {}
    vae_path = cfg.vae.path
    if not vae_path:
        result = _fit(vae_trainer(cfg))
        vae_path = os.path.join(result.checkpoint.path, "vae")
        out["vae"] = {"metrics": result.metrics, "checkpoint": result.checkpoint.path}
        if cfg.vae.decoder_minutes:
            result = _fit(vae_trainer(cfg, decoder_of=vae_path))
            vae_path = os.path.join(result.checkpoint.path, "vae")
            out["vae_decoder"] = {"metrics": result.metrics, "checkpoint": result.checkpoint.path}
    result = _fit(denoiser_trainer(cfg, vae_path))
    out["denoiser"] = {"metrics": result.metrics, "checkpoint": result.checkpoint.path,
                       "pipeline": os.path.join(result.checkpoint.path, "pipeline")}
    return out
