"""Ray Train plumbing shared by every training job: one run section and the ``TorchTrainer`` builder."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from raypref.config import check


@dataclass(frozen=True)
class RunSection:
    """Where a Ray Train run lives, its resources and fault tolerance."""

    name: str = field(default="run", metadata={"help": "Ray Train run name: re-running the same name resumes"})
    storage_path: str = field(default="~/raypref_runs", metadata={"help": "local dir or s3:// / gs:// URI"})
    num_workers: int = field(default=1, metadata={"help": "data-parallel workers"})
    cpus_per_worker: float = 2.0
    use_gpu: bool = False
    checkpoint_every: int = field(default=100, metadata={"help": "optimizer steps between checkpoints"})
    log_every: int = field(default=10, metadata={"help": "optimizer steps between metric reports"})
    export_dir: str = field(default="", metadata={"help": "if set, rank 0 also writes the final model here"})
    max_failures: int = field(default=0, metadata={"help": "worker failures to restart from a checkpoint"})
    keep_checkpoints: int = field(default=2, metadata={"help": "0 keeps every checkpoint"})
    # One thread avoids OpenMP barrier stalls when other processes share the cores.
    torch_threads: int = field(default=0, metadata={"help": "torch threads per worker (0: cpus_per_worker)"})

    def __post_init__(self):
        check(bool(self.name), "run.name must not be empty")
        check(self.num_workers >= 1, f"run.num_workers must be >= 1, got {self.num_workers}")
        check(self.checkpoint_every >= 1, f"run.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        check(self.log_every >= 1, f"run.log_every must be >= 1, got {self.log_every}")
        check(self.torch_threads >= 0, f"run.torch_threads must be >= 0, got {self.torch_threads}")


def torch_trainer(loop, loop_config: dict, run: RunSection, datasets: dict | None = None):
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


def worker_threads(run: RunSection) -> int:
    """Torch threads for a worker of ``run``."""
    return run.torch_threads or max(1, int(run.cpus_per_worker))
