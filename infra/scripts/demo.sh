#!/usr/bin/env bash
# The main job on embedded defaults: embedded Postgres+pgvector, embedded broker, local workers,
# a sample of the real photos enriched end to end. Extra arguments go to `enrich demo`.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash infra/scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/enrich demo "$@"
