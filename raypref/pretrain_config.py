"""Configuration of the shapes base model's pretraining (``raypref.pretrain``): sections, the preset."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from raypref.config import check
from raypref.raytrain import RunSection
from raypref.shapes.render import SIZE_RANGE


@dataclass(frozen=True)
class ModelSection:
    size: str = field(default="small", metadata={
        "help": "raypref.shapes.model.SIZES, e.g. tiny (16 px, for tests) or small (32 px, 8 x 8 latents)"})
    init_seed: int = field(default=0, metadata={"help": "seed of the random initial weights"})
    init_from: str = field(default="", metadata={
        "help": "a saved shapes pipeline whose UNet and text encoder start stage 2 (continued training; "
                "set vae.path to its vae/ too)"})

    def __post_init__(self):
        from raypref.shapes.model import SIZES

        check(self.size in SIZES, f"model.size must be one of {list(SIZES)}, got {self.size!r}")
        if self.init_from:
            for sub in ("unet", "text_encoder"):
                check(os.path.isdir(os.path.join(os.path.expanduser(self.init_from), sub)),
                      f"model.init_from {self.init_from!r} is not a saved pipeline (no {sub}/ in it)")


@dataclass(frozen=True)
class DataSection:
    teacher: str = field(default="clean", metadata={"help": "raypref.shapes.teachers.PROFILES"})
    pool_size: int = field(default=20000, metadata={"help": "renders per run, split across workers"})
    size_range: tuple[int, int] = field(default=SIZE_RANGE, metadata={"help": "object sizes (px at 32 x 32)"})
    cfg_dropout: float = field(default=0.1, metadata={"help": "fraction of empty prompts (classifier-free guidance)"})
    seed: int = 0

    def __post_init__(self):
        from raypref.shapes.teachers import PROFILES

        check(self.teacher in PROFILES, f"data.teacher must be one of {list(PROFILES)}, got {self.teacher!r}")
        check(self.pool_size >= 1, f"data.pool_size must be >= 1, got {self.pool_size}")
        check(len(self.size_range) == 2 and 1 <= self.size_range[0] <= self.size_range[1],
              f"data.size_range must be (lo, hi) with 1 <= lo <= hi, got {self.size_range}")
        check(0 <= self.cfg_dropout < 1, f"data.cfg_dropout must be in [0, 1), got {self.cfg_dropout}")


@dataclass(frozen=True)
class VAESection:
    path: str = field(default="", metadata={"help": "a trained VAE directory to use instead of training one"})
    # Every size a render may use, whatever data.size_range the denoiser learns: the VAE also encodes
    # the teachers' and the model's images during preference training.
    size_range: tuple[int, int] = field(default=(4, 7), metadata={"help": "object sizes of the VAE's renders"})
    lr: float = 1e-3
    batch_size: int = field(default=32, metadata={"help": "global, split across workers"})
    max_steps: int = 4000
    max_minutes: float = field(default=22.0, metadata={"help": "> 0: stop (and finish the LR schedule) by time"})
    # Crowded scenes of large objects leave 2 px between objects, which a decoder trained on a wider
    # size range blurs shut (four objects read as fewer): the decoder alone then trains on the
    # denoiser's renders; the encoder is frozen, so the latents (and the latent scaling) do not change.
    decoder_minutes: float = field(default=15.0, metadata={"help": "then the decoder alone on data.size_range "
                                                                   "(0 = skip)"})
    # A denoiser's latents are slightly off the encoder's; a decoder that only saw exact latents renders
    # the error as soft corners and tinted fringes, which the detector reads as the wrong shape or colour.
    decoder_latent_noise: float = field(default=1.0, metadata={
        "help": "decoder phase: half of each batch decodes latents plus Gaussian noise of up to this many "
                "latent standard deviations, so small latent errors still decode to crisp shapes (0 = off)"})
    warmup_steps: int = 100
    kl_weight: float = field(default=1e-8, metadata={"help": "KL to N(0, 1), summed over the latent"})
    edge_weight: float = field(default=5.0, metadata={"help": "loss weight of pixels on an object's edge"})
    eval_per_category: int = field(default=50, metadata={"help": "clean renders per category in the "
                                                                 "reconstruction ShapesEval (0 = none)"})

    def __post_init__(self):
        check(self.lr > 0, f"vae.lr must be > 0, got {self.lr}")
        check(self.batch_size >= 1 and self.max_steps >= 1, "vae.batch_size and vae.max_steps must be >= 1")
        check(self.max_minutes >= 0 and self.decoder_minutes >= 0,
              f"vae.max_minutes and vae.decoder_minutes must be >= 0, got {self.max_minutes}, {self.decoder_minutes}")
        check(self.decoder_latent_noise >= 0,
              f"vae.decoder_latent_noise must be >= 0, got {self.decoder_latent_noise}")
        check(self.kl_weight >= 0 and self.edge_weight >= 1, "vae.kl_weight must be >= 0 and vae.edge_weight >= 1")
        check(len(self.size_range) == 2 and 1 <= self.size_range[0] <= self.size_range[1],
              f"vae.size_range must be (lo, hi) with 1 <= lo <= hi, got {self.size_range}")


@dataclass(frozen=True)
class OptimSection:
    lr: float = 4e-4
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    warmup_steps: int = 200
    batch_size: int = field(default=64, metadata={"help": "global, split across workers"})
    max_steps: int = 100_000
    max_minutes: float = field(default=115.0, metadata={"help": "> 0: stop (and finish the LR schedule) by time"})
    grad_clip: float = 1.0
    ema_decay: float = 0.999

    def __post_init__(self):
        check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        check(self.batch_size >= 1 and self.max_steps >= 1, "optim.batch_size and optim.max_steps must be >= 1")
        check(0 <= self.ema_decay < 1, f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")
        check(self.max_minutes >= 0, f"optim.max_minutes must be >= 0, got {self.max_minutes}")


@dataclass(frozen=True)
class EvalSection:
    every: int = field(default=2000, metadata={"help": "steps between quick ShapesEvals of the EMA model (0 = never)"})
    per_category: int = field(default=10, metadata={"help": "prompts per category of the quick ShapesEval"})

    def __post_init__(self):
        check(self.every >= 0 and self.per_category >= 1, "eval.every must be >= 0 and eval.per_category >= 1")


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    vae: VAESection = field(default_factory=VAESection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    run: RunSection = field(default_factory=lambda: RunSection(name="pretrain-shapes", checkpoint_every=500))

    def __post_init__(self):
        for name, bs in (("optim", self.optim.batch_size), ("vae", self.vae.batch_size)):
            check(bs % self.run.num_workers == 0,
                  f"{name}.batch_size {bs} must divide by run.num_workers {self.run.num_workers}")


def shapes_cpu() -> PretrainConfig:
    """The 8 x 8-latent recipe on a 2-core CPU (``model.size=latent16`` and the stages in docs/results.md,
    "16 x 16 latents", made the shipped model)."""
    return PretrainConfig()


PRESETS = {"shapes_cpu": shapes_cpu}
