#!/usr/bin/env bash
# The GPU benchmark, prepared for the day a GPU machine is lent (not a test; about 8 minutes).
#
#     bash infra/bench/gpu.sh                 # on a CUDA machine: real-size random-init models on cuda:0
#     bash infra/bench/gpu.sh --dry-run       # here, on the CPU: tiny models, checks the plumbing (~3 min)
#
# It installs nothing beyond the project: it uses .venv when there is one, else python3, plus the
# wheels in .whl/ (infra/bench/gpu_wheels.sh downloads them where a package index is reachable) for
# what a bare CUDA image lacks. Results land in $OUT (or bench-gpu/):
#
#   1. models.json  bench_models.py: each model stage alone on ready inputs (bf16/fp16 autocast on
#                   CUDA, as the workers run), batch sweep 1-64: items/s and peak GPU memory;
#   2. worker.json  bench_gpu_worker.py: the GPU worker's batch function (every stage, in the
#                   worker's order) at batch 8 and 32, each with the grammar look-ahead off and on
#                   (ENRICH_MODELS__GRAMMAR_OVERLAP): products/s and ms per product per stage;
#   3. pipeline.json bench_pipeline.py with the GPU worker on cuda:0, when RabbitMQ runs here;
#   4. gpu.csv      nvidia-smi samples (utilisation, memory) every 250 ms, summarised per phase.
#
# Every phase has its own time limit, so the whole run stays inside 8 minutes; a phase cut short
# keeps the cells it finished (the JSON is rewritten after each).
set -uo pipefail
cd "$(dirname "$0")/../.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-bench-gpu}
mkdir -p "$OUT"
PY=python3
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ $PY == python3 ]] && compgen -G ".whl/*.whl" > /dev/null; then  # the project venv has them all
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site .whl/*.whl \
    || { echo "gpu.sh: installing .whl/ failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import torch, transformers, open_clip, xgrammar, structlog, pydantic" 2>"$OUT/import-error.txt"; then
  echo "gpu.sh: the model stages' packages are missing ($(tail -1 "$OUT/import-error.txt")); run" \
       "infra/bench/gpu_wheels.sh where an index is reachable and bring .whl/ along" >&2
  exit 2
fi

if [[ $DRY == 1 ]]; then
  DEVICE=cpu PROFILE=tiny SWEEP=1,2 LISTING_SWEEP=1,2 N=4 WORKER_SWEEP=2,4
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: no CUDA device visible to torch (use --dry-run on a CPU machine)" >&2
    exit 2
  fi
  DEVICE=cuda:0 PROFILE=random-full SWEEP=1,2,4,8,16,32,64 LISTING_SWEEP=1,8,32,64 N=64 WORKER_SWEEP=8,32
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi

SAMPLER=
if [[ $DRY == 0 ]] && command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 250 > "$OUT/gpu.csv" &
  SAMPLER=$!
fi
trap '[[ -n "$SAMPLER" ]] && kill "$SAMPLER" 2>/dev/null' EXIT

phase() {  # phase NAME LIMIT_S COMMAND...: run one phase under its limit, mark its span for the summary
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  echo "$name start $(date +%s.%N)" >> "$OUT/phases.txt"
  timeout --signal=TERM --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "$name end $(date +%s.%N)" >> "$OUT/phases.txt"
  [[ $rc == 124 ]] && echo "   $name reached its ${limit}s limit; the cells it finished are kept"
  return 0
}

: > "$OUT/phases.txt"
START=$(date +%s)
# Each model alone. The listing stage decodes up to 64 tokens per row, so it sweeps fewer sizes.
phase models 140 "$PY" infra/bench/bench_models.py --profiles "$PROFILE" --device "$DEVICE" \
  --stages grounding,clip_image,clip_text,verify --batch-sizes "$SWEEP" --full-batch-sizes "$SWEEP" \
  --min-iters 2 --max-seconds 2 --out "$OUT/models.json"
phase listing 80 "$PY" infra/bench/bench_models.py --profiles "$PROFILE" --device "$DEVICE" \
  --stages listing --batch-sizes "$LISTING_SWEEP" --full-batch-sizes "$LISTING_SWEEP" \
  --min-iters 1 --max-seconds 2 --out "$OUT/listing.json"
phase worker 120 "$PY" infra/bench/bench_gpu_worker.py --profile "$PROFILE" --device "$DEVICE" --n "$N" \
  --batch-sizes "$WORKER_SWEEP" --grammar-overlap both --out "$OUT/worker.json"
if (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  phase pipeline 120 "$PY" infra/bench/bench_pipeline.py --profile "$PROFILE" --device "$DEVICE" --n "$N" \
    --batch-size 8 --out "$OUT/pipeline.json"
else
  echo "== pipeline skipped: no RabbitMQ on 127.0.0.1:5672 here (the broker-level run needs one)"
fi
[[ -n "$SAMPLER" ]] && kill "$SAMPLER" 2>/dev/null
SAMPLER=

"$PY" - "$OUT" <<'EOF'
import csv, datetime, json, sys
from pathlib import Path

out = Path(sys.argv[1])
spans, marks = {}, {}
for line in (out / "phases.txt").read_text().splitlines():
    name, what, at = line.split()
    marks.setdefault(name, {})[what] = float(at)
samples = []
if (out / "gpu.csv").exists():
    for row in csv.reader((out / "gpu.csv").read_text().splitlines()):
        try:
            at = datetime.datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((at, float(row[1]), float(row[2])))
        except (ValueError, IndexError):
            continue
print(f"{'phase':10} {'seconds':>8} {'gpu_util_mean_%':>15} {'gpu_util_max_%':>14} {'gpu_mem_max_MiB':>15}")
for name, m in marks.items():
    inside = [s for s in samples if m.get("start", 0) <= s[0] <= m.get("end", 0)]
    util = [s[1] for s in inside]
    mem = [s[2] for s in inside]
    mean = f"{sum(util) / len(util):.0f}" if util else "-"
    print(f"{name:10} {m.get('end', 0) - m.get('start', 0):8.1f} {mean:>15} {max(util, default=0):14.0f} {max(mem, default=0):15.0f}")
for name in ("models", "listing"):
    path = out / f"{name}.json"
    if path.exists():
        cells = json.loads(path.read_text())["cells"]
        print(f"\n{name}: stage batch items/s peak_MiB")
        for c in cells:
            print(f"  {c['stage']:10} {c['batch']:5d} {c['items_per_s'] or 0:9.2f} {c['peak_mb'] or 0:9.0f}")
if (out / "worker.json").exists():
    print("\nworker: batch overlap products/s peak_MiB ms-per-product-by-stage")
    for c in json.loads((out / "worker.json").read_text())["cells"]:
        overlap = str(c.get("grammar_overlap", True))
        print(f"  {c['batch']:5d} {overlap:>7} {c['products_per_s']:9.2f} {c['peak_mib'] or 0:9} {c['stage_ms_per_product']}")
EOF
echo "gpu.sh: done in $(( $(date +%s) - START )) s; files in $OUT/"
