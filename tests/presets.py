"""Seconds-long configs for the tests (16 x 16 images, tiny models, two teachers, a step or two).

They live with the tests, not in the library: their paths are set by each test.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from raypref import director_config, evolve_config, ospo_config, synpic_config, train_config
from raypref.config import to_dict
from raypref.judges import JudgeSection
from raypref.raytrain import RunSection


def train_tiny() -> train_config.TrainConfig:
    """Tiny model (path set by the test), 2 workers, 2 steps."""
    return train_config.TrainConfig(
        model=train_config.ModelSection(path="unset-model", lora_rank=4, lora_alpha=4.0),
        data=train_config.DataSection(path="unset-prefs.parquet"),
        loss=train_config.LossSection(beta=500.0),
        optim=train_config.OptimSection(lr=1e-3, warmup_steps=0, batch_size=4, max_steps=2),
        run=RunSection(name="prefs-tiny", num_workers=2, cpus_per_worker=0.5, checkpoint_every=1, log_every=1),
    )


def synpic_tiny() -> synpic_config.SynPicConfig:
    """16 x 16 teachers, 2 prompts per category, chunks of 4. Tests set the checkpoint and output."""
    s = synpic_config
    return s.SynPicConfig(
        prompts=s.PromptsSection(n_per_category=2),
        generators=s.GeneratorsSection(specs=("teacher:prism", "teacher:quill"), image_size=16,
                                       num_inference_steps=2, batch_size=4),
        rewards=s.RewardsSection(batch_size=8),
        run=s.RunSection(output_dir="unset-synpic", chunk_size=4, window_chunks=0, progress=False),
    )


def director_tiny() -> director_config.DirectorConfig:
    """16 x 16, two teachers, a handful of prompts."""
    d = director_config
    return d.DirectorConfig(
        data=d.DataSection(directory="unset-director", n_per_category=2, init_teacher="mix", image_size=16),
        round=d.RoundSection(rounds=2, sample_fraction=0.5, n_expand=1, p_mutate=0.5, batch_size=16),
        models=d.ModelsSection(teachers=("clean", "vellum"), base="teacher:vellum", base_steps=4),
        judge=JudgeSection(error_rate=0.0),
        run=d.RunSection(name="director-tiny"),
    )


def ospo_tiny() -> ospo_config.OSPOConfig:
    """A procedural teacher as the model, 2 prompts per category."""
    o = ospo_config
    return o.OSPOConfig(
        prompts=o.PromptSection(per_category=2),
        generate=o.GenerateSection(generator="teacher:vellum", slots=2),
        run=o.RunSection(
            output="unset-ospo.parquet", use_ray="never", num_actors=2, cpus_per_actor=0.25, batch_size=8
        ),
    )


def evolve_tiny() -> evolve_config.EvolveConfig:
    """Rounds of a 16 x 16 tiny pipeline (``model.base`` set by the test), two teachers, one prompt per
    category, two optimizer steps per training. The fields the driver links stay at their defaults."""
    e, d, s = evolve_config, director_config, synpic_config
    return e.EvolveConfig(
        run=e.RunSection(name="evolve-tiny", output_dir="unset-evolve", rounds=2, num_cpus=4.0),
        model=e.ModelSection(base="unset-base", steps=2, guidance=3.0),
        director=d.DirectorConfig(
            data=d.DataSection(n_per_category=1, init_teacher="mix"),
            round=d.RoundSection(rounds=999, sample_fraction=1.0, n_expand=1, p_mutate=0.5, batch_size=16),
            models=d.ModelsSection(teachers=("clean", "vellum")),
            judge=JudgeSection(error_rate=0.0),
            run=d.RunSection(name="evolve-director-tiny"),
        ),
        judge_serve=e.JudgeServeSection(max_batch_size=8),
        sft=e.train_recipe("sft", 2, 1e-3, batch=4, cpus=0.5),
        synpic=s.SynPicConfig(
            prompts=s.PromptsSection(n_per_category=1),
            generators=s.GeneratorsSection(specs=("teacher:prism", "teacher:quill"), batch_size=8),
            rewards=s.RewardsSection(batch_size=8),
            run=s.RunSection(chunk_size=8, window_chunks=0, progress=False),
        ),
        ospo=ospo_config.OSPOConfig(
            prompts=ospo_config.PromptSection(per_category=2),
            generate=ospo_config.GenerateSection(slots=2),
            run=ospo_config.RunSection(use_ray="never", num_actors=2, cpus_per_actor=0.25, batch_size=8),
        ),
        train=e.train_recipe("dpo", 2, 1e-3, batch=4, cpus=0.5),
        eval=e.EvalSection(n_per_category=2, seed=0, batch_size=16, report_prompts=e.REPORT_PROMPTS[:3]),
    )


def config_file(cfg, path) -> str:
    """``cfg`` as a YAML file for a job's ``--config`` (the tiny configs are not the jobs' presets)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return str(path)
