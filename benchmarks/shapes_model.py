"""Shapes base model throughput on this machine: pretraining samples/s (VAE and denoiser stages)
and generation images/s.

    .venv/bin/python benchmarks/shapes_model.py --size small --threads 2

Pretraining: one optimisation step of each stage as ``raypref.pretrain`` runs it (fp32, AdamW) on a
batch of teacher renders: the VAE's reconstruction step, and flow matching of the UNet + text
encoder on VAE latents (encoded once, as the job does). Generation: the stock
``StableDiffusionPipeline.__call__`` through the SD1.5 adapter, with classifier-free guidance.
"""

from __future__ import annotations

import argparse
import time

import torch

from raypref.diffusion import NoiseSchedule
from raypref.models import SD15Adapter, images_to_pixels, vae_encode
from raypref.shapes.autoencoder import edge_weights
from raypref.shapes.teachers import render_pool
from raypref.shapes.model import SIZES, build_pipeline, encode_text, model_size


def timed(step, n: int) -> float:
    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64, help="denoiser batch (the VAE stage uses half)")
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--gen-images", type=int, default=64)
    ap.add_argument("--gen-steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe = build_pipeline(args.size)
    res = model_size(args.size).resolution
    prompts, images = render_pool("clean", args.batch_size, res, (4, 7), seed=0)
    pixels = images_to_pixels(images)

    vae, half = pipe.vae, pixels[: args.batch_size // 2]
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)

    def vae_step():
        post = vae.encode(half).latent_dist
        err = vae.decode(post.sample()).sample - half
        loss = (edge_weights(half, 5.0) * (err**2 + err.abs())).mean() + 1e-8 * post.kl().sum() / len(half)
        vae_opt.zero_grad()
        loss.backward()
        vae_opt.step()

    x0 = vae_encode(vae, pixels)
    sched = NoiseSchedule("flow")
    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def unet_step():
        noise = torch.randn_like(x0)
        t = sched.sample_timesteps(len(x0))
        pred = pipe.unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=encode_text(pipe, prompts)).sample
        loss = torch.nn.functional.mse_loss(pred, sched.target(x0, noise, t))
        opt.zero_grad()
        loss.backward()
        opt.step()

    vae_s, unet_s = timed(vae_step, args.train_steps), timed(unet_step, args.train_steps)
    model = SD15Adapter(pipe)
    model.generate(prompts[:2], [0, 1], num_inference_steps=2)  # warm-up
    t0 = time.perf_counter()
    gen_prompts = (prompts * (args.gen_images // len(prompts) + 1))[: args.gen_images]
    model.generate(gen_prompts, list(range(args.gen_images)), num_inference_steps=args.gen_steps, guidance_scale=3.0)
    gen_s = time.perf_counter() - t0
    count = lambda *ms: sum(p.numel() for m in ms for p in m.parameters())  # noqa: E731
    print(
        f"model {args.size}: UNet {count(pipe.unet) / 1e6:.2f} M, "
        f"text encoder {count(pipe.text_encoder) / 1e6:.2f} M, "
        f"VAE {count(vae) / 1e6:.2f} M params; {res} px, latents {tuple(x0.shape[1:])}, threads {args.threads}"
    )
    print(f"pretraining VAE: {len(half) / vae_s:.1f} samples/s ({vae_s:.3f} s per step of {len(half)})")
    print(
        f"pretraining denoiser: {args.batch_size / unet_s:.1f} samples/s "
        f"({unet_s:.3f} s per step of {args.batch_size})"
    )
    print(
        f"generation: {args.gen_images / gen_s:.2f} images/s ({args.gen_steps} steps, CFG 3, batch {args.gen_images})"
    )


if __name__ == "__main__":
    main()
