#!/usr/bin/env bash
# The test command of README.md: does its own set-up on a fresh machine, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
python -m ipykernel install --sys-prefix --name qwenlab --display-name "qwenlab (Python 3)" >/dev/null
if [ -f scripts/browser_setup.sh ]; then
  bash scripts/browser_setup.sh
  export QWENLAB_REQUIRE_BROWSER=1
fi
export HF_HUB_OFFLINE=1
unset MPLBACKEND
lint-imports  # the import layers of doc/architecture.md (contracts in pyproject.toml)
python -m pytest -q "$@"
