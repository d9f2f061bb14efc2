#!/usr/bin/env bash
# Set up ./.venv if needed, then run the main job: fine-tune MiniLM on Rotten Tomatoes while
# pruning it (recipes/quickstart.yaml). Extra arguments go to `prune-callbacks finetune`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/prune-callbacks finetune recipes/quickstart.yaml --output-dir outputs/quickstart \
  --set output.overwrite=true "$@"
