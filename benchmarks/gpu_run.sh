#!/usr/bin/env bash
# Full quality setting + overhead on one GPU, in under ~10 minutes (H200 estimate; not run yet).
# Prepare on the CPU machine first:  python benchmarks/gpu_prepare.py   (fills .device_carry/, git-ignored)
# then run this from the repo root on the GPU machine, carrying .device_carry. Results go to $OUT (or
# benchmarks/results). Rerunning continues where a cut run stopped (--resume); runs in flight are redone.
set -u
OUT=${OUT:-benchmarks/results}
C=.device_carry
mkdir -p "$OUT"
python -c "import torch, transformers, datasets, pandas, pydantic; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))" || exit 3
rm -rf /tmp/pc_claims
Q="python benchmarks/quality.py --setting full --queue --device cuda --threads 4 --resume --claim-dir /tmp/pc_claims --minilm-dir $C/minilm_fp16 --rt-csv $C/rotten_tomatoes_corpus_full.csv.bz2"
# MiniLM uses a small part of an H200: two workers share one queue
timeout 450 $Q --out "$OUT/quality_full.w0.json" > "$OUT/quality_full.w0.log" 2>&1 &
sleep 30
timeout 420 $Q --out "$OUT/quality_full.w1.json" > "$OUT/quality_full.w1.log" 2>&1 &
wait
python benchmarks/quality.py --merge "$OUT"/quality_full.w*.json --out "$OUT/quality_full.json"
timeout 100 python benchmarks/overhead.py --device cuda --dtype bf16 --batch 32 --seq 128 --models bert-base minilm \
  --rounds 10 --block-steps 5 --threads 4 --out "$OUT/overhead_cuda.json" > "$OUT/overhead_cuda.log" 2>&1
python benchmarks/plot.py --results "$OUT" > "$OUT/tables.md" 2>&1
tail -n 5 "$OUT"/*.log
