#!/usr/bin/env bash
# Set up (idempotent), check the code with ruff, and run the test suite. Extra arguments go to
# pytest, e.g. `-m slow` for the long tests that benchmarks and reproduction jobs use.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
.venv/bin/ruff check --quiet .  # style and static errors, before any test runs
exec .venv/bin/python -m pytest -q "$@"
