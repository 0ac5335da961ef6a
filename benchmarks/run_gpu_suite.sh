#!/usr/bin/env bash
# The GPU benchmark suite, results as JSON (+ PNG) under OUT_DIR, then the README tables:
#   - training step, fastmae (eager and torch.compile) vs naive w/[M] vs reference-style vs HF ViTMAE,
#     ViT-B/16, ViT-L/16, ViT-H/14 at 224 px, bf16, batch 256 (halved where memory runs out);
#   - the paper's Table 2 (ViT-L and ViT-H, decoder depth 8 and 1, with and without mask tokens);
#   - the per-component profile of each model.
# Usage: benchmarks/run_gpu_suite.sh [OUT_DIR]     (default: benchmarks/results)
# Each command below also runs on its own (each takes a few minutes on an H100).
set -euo pipefail
out="${1:-benchmarks/results}"
models="mae_vit_base_patch16 mae_vit_large_patch16 mae_vit_huge_patch14"
mkdir -p "$out"
for model in $models; do
  python -m fastmae bench step --model "$model" --batch_size 256 --oom_fallback --dtype bf16 --out_dir "$out"
done
python -m fastmae bench table2 --batch_size 256 --oom_fallback --dtype bf16 --out_dir "$out"
for model in $models; do
  python -m fastmae profile --model "$model" --batch_size 64 --dtype bf16 --out_dir "$out"
done
python benchmarks/make_results_table.py --results_dir "$out"
