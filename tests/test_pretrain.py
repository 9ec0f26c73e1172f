"""Pretraining the shapes model with Ray Train: both stages data-parallel, checkpoints, kill and resume."""

import dataclasses
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from raypref.config import load_config, merge
from raypref.pretrain import denoiser_trainer, lr_factor, pretrain
from raypref.pretrain_config import (
    PRESETS, DataSection, EvalSection, ModelSection, OptimSection, PretrainConfig, VAESection,
)
from raypref.raytrain import RunSection
from raypref.shapes.autoencoder import edge_weights
from raypref.shapes.model import build_pipeline


def tiny_test() -> PretrainConfig:
    """A seconds-long run: 16 x 16, tiny model, 2 workers."""
    return PretrainConfig(
        model=ModelSection(size="tiny"),
        data=DataSection(pool_size=64, size_range=(3, 5)),
        vae=VAESection(size_range=(3, 5), lr=2e-3, warmup_steps=0, batch_size=8, max_steps=30, max_minutes=0,
                       decoder_minutes=1.0, eval_per_category=2),  # both phases stop at max_steps
        optim=OptimSection(lr=1e-3, warmup_steps=0, batch_size=8, max_steps=6, max_minutes=0),
        eval=EvalSection(every=0),
        run=RunSection(name="pretrain-tiny", num_workers=2, cpus_per_worker=0.5, checkpoint_every=3),
    )


def _cfg(tmp_path, name, **optim):
    return merge(tiny_test(), {"run": {"storage_path": str(tmp_path), "name": name, "keep_checkpoints": 0},
                               "optim": optim})


def _params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _losses(run_dir):
    """loss_avg by step from a Ray Train run directory's checkpoint snapshots."""
    snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    return {r["metrics"]["step"]: r["metrics"]["loss_avg"] for r in snap["checkpoint_results"]}


def test_two_worker_run_trains_the_vae_then_the_unet(ray_local, tmp_path):
    """Both stages on 2 Ray Train workers: each stage's loss falls and its weights change; the result
    is a stock StableDiffusionPipeline whose VAE is the trained one (with its latent scaling)."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    cfg = _cfg(tmp_path, "dp", max_steps=30, lr=2e-3)
    # each checkpoint is seconds of Ray Train's time; the decoder phase on noisy latents too
    cfg = merge(cfg, {"run": {"checkpoint_every": 10}, "vae": {"decoder_latent_noise": 0.3}})
    out = pretrain(cfg)
    vae_losses, unet_losses = _losses(tmp_path / "dp-vae"), _losses(tmp_path / "dp-unet")
    assert max(vae_losses) == 30 and max(unet_losses) == 30
    assert vae_losses[30] < 0.8 * vae_losses[10] and unet_losses[30] < 0.8 * unet_losses[10]
    assert "recon_shapes_eval" in out["vae"]["metrics"]
    trained = DiffusionPipeline.from_pretrained(out["denoiser"]["pipeline"])
    assert type(trained) is StableDiffusionPipeline
    init = build_pipeline("tiny", seed=cfg.model.init_seed)
    assert not torch.allclose(_params(trained.unet), _params(init.unet))
    assert not torch.allclose(_params(trained.vae), _params(init.vae))
    assert trained.vae.config.scaling_factor != init.vae.config.scaling_factor
    # the decoder phase trained the decoder only: the encoder (hence the latents the UNet learned) and
    # the latent scaling are those of the first phase
    from diffusers import AutoencoderKL

    first = AutoencoderKL.from_pretrained(os.path.join(out["vae"]["checkpoint"], "vae"))
    assert out["vae_decoder"]["metrics"]["stage"] == "vae-decoder"
    assert torch.equal(_params(first.encoder), _params(trained.vae.encoder))
    assert not torch.equal(_params(first.decoder), _params(trained.vae.decoder))
    assert first.config.scaling_factor == trained.vae.config.scaling_factor


def test_killed_worker_resumes_from_its_last_checkpoint(ray_local, tmp_path):
    from ray._private.state import actors

    cfg = _cfg(tmp_path, "resume", max_steps=300)
    cfg = merge(cfg, {"run": {"checkpoint_every": 50, "max_failures": 1, "num_workers": 1}})
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, batch_size=8))
    out = {}
    vae = build_pipeline("tiny").vae  # stage 2 alone, on a (random) VAE
    vae.save_pretrained(tmp_path / "vae")
    trainer = denoiser_trainer(cfg, str(tmp_path / "vae"))
    runner = threading.Thread(target=lambda: out.setdefault("result", trainer.fit()))
    runner.start()
    run_dir = tmp_path / "resume-unet"
    deadline = time.time() + 240
    # Kill only once the controller has registered a checkpoint (Ray Train V2 writes this snapshot
    # when it does): a checkpoint uploaded but not yet registered is lost with its worker.
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while time.time() < deadline and not (snapshot.exists() and "checkpoint_" in snapshot.read_text()):
        time.sleep(0.2)
    assert snapshot.exists(), "no checkpoint was registered"
    # The actor table of THIS session's cluster (its GCS): the dashboard-based state API could
    # answer for another Ray instance on the same machine.
    workers = [a for a in actors(actor_state_name="ALIVE").values()
               if "RayTrainWorker" in a.get("ActorClassName", "") and a["Pid"]]
    assert workers, "no live training worker to kill"
    os.kill(workers[0]["Pid"], signal.SIGKILL)  # a real crash, mid-run
    runner.join(timeout=300)
    result = out["result"]
    assert result.error is None
    assert result.metrics["step"] == 300
    assert result.metrics["resumed_from_step"] >= 50  # restarted from a checkpoint, not from step 0



def test_continued_training_starts_from_a_saved_pipeline(ray_local, tmp_path):
    """model.init_from: stage 2 starts from the saved pipeline's UNet and text encoder (a tiny learning
    rate and one step leave them where they started), not from the random initialisation."""
    from diffusers import DiffusionPipeline

    src = build_pipeline("tiny", seed=5)
    src.save_pretrained(tmp_path / "src")
    cfg = merge(_cfg(tmp_path, "cont", max_steps=1, lr=1e-9), {
        "model": {"init_from": str(tmp_path / "src")}, "vae": {"path": str(tmp_path / "src" / "vae")},
        "run": {"num_workers": 1, "checkpoint_every": 1}})
    out = pretrain(cfg)
    assert "vae" not in out  # vae.path set: no VAE stage
    got = DiffusionPipeline.from_pretrained(out["denoiser"]["pipeline"])
    for name in ("unet", "text_encoder"):
        assert torch.allclose(_params(getattr(got, name)), _params(getattr(src, name)), atol=1e-6), name
    assert not torch.allclose(_params(got.unet), _params(build_pipeline("tiny", seed=cfg.model.init_seed).unet))
    with pytest.raises(ValueError, match=r"model.init_from .* is not a saved pipeline \(no unet/"):
        ModelSection(init_from=str(tmp_path))


def test_every_preset_builds_and_validates():
    for name, preset in {**PRESETS, "tiny_test": tiny_test}.items():
        cfg = preset()
        assert isinstance(cfg, PretrainConfig), name
    with pytest.raises(ValueError, match="vae.batch_size 7 must divide"):
        load_config(tiny_test(), overrides=["vae.batch_size=7"])
    with pytest.raises(ValueError, match="optim.lr"):
        load_config(tiny_test(), overrides=["optim.lr=-1"])
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(tiny_test(), overrides=["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="expects float"):
        load_config(tiny_test(), overrides=["optim.lr=fast"])
    assert load_config(tiny_test(), overrides=["optim.lr=4e-4"]).optim.lr == 4e-4


def test_yaml_config_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.01\n  max_steps: 7\ndata:\n  size_range: [3, 6]\n")
    cfg = load_config(tiny_test(), f, ["optim.max_steps=9"])
    assert (cfg.optim.lr, cfg.optim.max_steps, cfg.data.size_range) == (0.01, 9, (3, 6))


def test_lr_schedule_warms_up_then_decays():
    assert lr_factor(0, 0.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 0.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(50, 0.5, 10, 0.1) == pytest.approx(0.55)
    assert lr_factor(99, 1.0, 10, 0.1) == pytest.approx(0.1)


def test_edge_weights_mark_pixels_next_to_a_colour_change():
    img = np.zeros((1, 6, 6, 3), np.uint8)
    img[0, 2:4, 2:4] = 200  # a 2 x 2 square: it and its 4-neighbours are edge pixels
    from raypref.models import images_to_pixels

    w = edge_weights(images_to_pixels(img), 5.0)[0, 0]
    expected = np.ones((6, 6))
    for y, x in [(2, 2), (2, 3), (3, 2), (3, 3), (1, 2), (1, 3), (4, 2), (4, 3), (2, 1), (3, 1), (2, 4), (3, 4)]:
        expected[y, x] = 5.0
    assert np.array_equal(w.numpy(), expected)
