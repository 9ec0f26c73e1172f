"""Ray Serve apps of raypref: the aligned image model (OpenAI-compatible images API) and the judge.

``serve/config.yaml`` deploys both by ``import_path`` (``raypref.serving.images:app_builder``,
``raypref.serving.judge:app_builder``); ``raypref serve`` runs them from the command line.
"""
