"""The driver's judge on Ray Serve: deployed on first use, reached through a ``DeploymentHandle``."""

from __future__ import annotations

import logging
import sys

from raypref.director import HandleJudge


class ServedJudge:
    """Starts the judge app (``raypref.serving.judge``) once, on first use; ``close()`` deletes only this app."""

    def __init__(self, cfg):
        self.cfg, self.judge = cfg, None

    def get(self) -> HandleJudge:
        if self.judge is None:
            from ray import serve

            from raypref.serving.judge import build_judge_app

            s, j = self.cfg.judge_serve, self.cfg.director.judge
            logger = logging.getLogger("ray.serve")
            level = logger.level  # what the driver asked for (WARNING unless --verbose)
            serve.start(proxy_location=s.proxy_location)  # no-op when Serve already runs
            app = build_judge_app(j.backend, j.kwargs(), num_cpus=s.num_cpus, num_gpus=s.num_gpus,
                                  autoscaling_config={"min_replicas": s.replicas, "max_replicas": s.replicas},
                                  max_batch_size=s.max_batch_size)
            handle = serve.run(app, name=s.app_name, route_prefix=None)
            logger.setLevel(level)  # Serve re-configures its logger when it starts
            self.judge = HandleJudge(handle)
        return self.judge

    def close(self) -> None:
        if self.judge is not None:
            from ray import serve

            try:
                serve.delete(self.cfg.judge_serve.app_name)
            except Exception as e:  # noqa: BLE001 - cleanup must not hide the run's own error
                print(f"[evolve] could not delete the judge app: {e}", file=sys.stderr)
            self.judge = None
