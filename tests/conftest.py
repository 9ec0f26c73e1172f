"""Shared fixtures: one session-scoped local Ray with oversubscribed logical CPUs."""

import os

import pytest

# Ray 2.60 turns on token auth for local clusters; tests run without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default: each run's start, checkpoints and end
# wait for a poll. Tests run dozens of short runs (inherited by the Ray started below).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster for the whole session. num_cpus=4 on a 2-core machine on purpose: actor
    pools must not starve Ray Data's read tasks (the 2-CPU deadlock)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
