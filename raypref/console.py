"""What a person at the terminal sees: the driver's own lines, not the libraries' progress bars or Ray's
internal logs (those stay in Ray's session log files, linked from the run directory)."""

from __future__ import annotations

import logging
import os
from pathlib import Path


def quiet_libraries() -> None:
    """Loading bars and info logs of diffusers / transformers off; Ray and Ray Data logs at WARNING."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")  # the driver's core worker (C++) log lines
    try:
        import ray.data  # configures its loggers on import: set their levels after it

        ray.data.DataContext.get_current().enable_progress_bars = False
    except ImportError:  # ray without the data extra
        pass
    quiet_ray_loggers()


def quiet_ray_loggers() -> None:
    """Ray's Python loggers at WARNING (Ray Serve re-configures its logger when it starts: call again)."""
    for name in ("ray", "ray.data", "ray.train", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)


def link_ray_logs(run_dir: Path) -> Path | None:
    """``run_dir/ray-logs`` -> this Ray session's log directory (workers' stdout and stderr, Serve's
    access logs, Ray Train's controller), so a run's internals are found next to its results."""
    import ray

    try:
        logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    except AttributeError:  # connected to a remote cluster: its logs stay on its nodes
        return None
    link = Path(run_dir) / "ray-logs"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(logs, link)
    return link
