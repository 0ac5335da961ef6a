#!/usr/bin/env bash
# The GPU checks and benchmarks, results as JSON (+ PNG) under OUT_DIR, then the README tables.
# Usage: benchmarks/run_gpu_suite.sh [OUT_DIR] [PART ...]     (default: benchmarks/results, every part)
# Parts, each a few minutes on an H100, in this order:
#   tests    the GPU tests (pytest -m gpu tests), a JUnit report in OUT_DIR
#   kernels  the fused kernels (encoder input, decoder input, loss, add + LayerNorm) against eager
#            PyTorch and torch.compile, ViT-B/L/H shapes
#   shapes   the memory-bound kernels (decoder input, loss, add + LayerNorm) under alternative launch shapes
#            (rows per tile, tiles per program, warps), beside the shape each launcher picks
#   base     training step, fastmae (eager, torch.compile, CUDA-graph replays) vs naive w/[M] (the same three)
#            vs reference-style vs HF ViTMAE,
#            ViT-B/16 at 224 px, bf16, batch 256 (halved where memory runs out)
#   large    the same for ViT-L/16
#   huge     the same for ViT-H/14
#   recipe   ViT-L/16 at the reference recipe's batch of 64 per GPU, where the host's launches weigh most:
#            fastmae eager, replayed as CUDA graphs, compiled per block, and reference-style
#   compile  ViT-L compiled per block, without and with CUDA graphs, and with max-autotune's GEMM search (Triton
#            GEMM templates can take the GELU and bias into their epilogue, which cuBLAS's kernels cannot)
#   ablation ViT-L eager with the PyTorch references instead of the Triton kernels (what the kernels
#            give a whole step)
#   table2   the paper's Table 2 (ViT-L and ViT-H, decoder depth 8 and 1, with and without mask tokens)
#   table2_compiled  the same with every row under torch.compile (eager rows without mask tokens are
#            partly bound by the host's kernel launches, which compiling removes; ~6 min)
#   table2_cudagraph  the same with every row's eager step replayed as one CUDA graph (no compile time)
#   profile  the per-component profile of each model, at batch 256 (ViT-H 128): smaller batches time
#            the host's kernel launches more than the GPU (ViT-L eager: 119 ms at batch 64, 106 at 256)
#   data     img/s of the CPU, hybrid (PIL decode, GPU resize) and torchvision-GPU loaders on generated
#            ImageNet-like JPEGs
#   train    real ViT-B/16 pretraining runs (batch 256, bf16, 240 steps in one epoch; hybrid eager, CUDA graph, cpu, then
#            hybrid compiled) on 5120 generated ImageNet-like JPEGs, each also under 15 more names (hard links: an epoch of
#            320 batches, so that no epoch boundary and no checkpoint falls in the timed steps, and the 64 batches the
#            16 workers read ahead during the start-up are a small part of them): img/s and the share of time waiting
#            for data (its summary.json)
#   suites   the pytest-benchmark suites' GPU cases (benchmarks/bench_*.py), timed, their JSON in OUT_DIR
# A failing command is reported and the rest still run; the exit status says whether all passed.
# On a copy of the working tree whose .git is not the commit it holds (the GPU machine), name the commit:
#   FASTMAE_GIT_COMMIT=$(git rev-parse HEAD) benchmarks/run_gpu_suite.sh ...   (expanded before sending)
set -uo pipefail
out="${1:-benchmarks/results}"
shift || true
parts=("$@")
all_parts=(tests kernels shapes base large huge recipe compile ablation table2 table2_compiled table2_cudagraph profile data
           train suites)
[ ${#parts[@]} -eq 0 ] && parts=("${all_parts[@]}")
for part in "${parts[@]}"; do
  [[ " ${all_parts[*]} " == *" $part "* ]] || { echo "unknown part '$part'; parts: ${all_parts[*]}" >&2; exit 2; }
done
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "run_gpu_suite.sh needs a CUDA GPU (torch.cuda.is_available() is False)" >&2
  exit 2
fi
if ! python -c "import fastmae.kernels" 2>/dev/null; then
  echo "fastmae is not installed: pip install -e . (offline: pip install --no-deps --no-build-isolation -e .)" >&2
  exit 2
fi
mkdir -p "$out"
status=0
run() {  # each command's wall time goes to stderr and OUT_DIR/suite_times.txt, to plan the next GPU session
  echo "+ $*" >&2
  local start=$SECONDS
  "$@" || { echo "FAILED ($?): $*" >&2; status=1; }
  printf '%5ds  %s\n' $((SECONDS - start)) "$*" | tee -a "$out/suite_times.txt" >&2
}
result_path() {  # result_path WHAT EXT: OUT_DIR/WHAT_<gpu>_<date>.EXT, the name every command gives its results
  local name
  name=$(python -c "import sys, torch; from fastmae.bench.environment import result_filename
print(result_filename(sys.argv[1], torch.device('cuda')))" "$1")
  echo "$out/${name%.json}$2"
}
step=(python -m fastmae bench step --batch_size 256 --oom_fallback --dtype bf16 --out_dir "$out")

for part in "${parts[@]}"; do
  case "$part" in
    tests)  # the kernels' many shapes each compile once: spread over workers where pytest-xdist is there
      parallel=()
      python -c "import xdist" 2>/dev/null && parallel=(-n 8)
      run python -m pytest -m gpu -q -p no:cacheprovider "${parallel[@]}" tests --junitxml "$(result_path gpu_tests .xml)" ;;
    suites) run python -m pytest -m gpu -q -p no:cacheprovider benchmarks --benchmark-enable \
              --benchmark-json "$(result_path pytest_benchmarks .json)" ;;
    kernels) run python benchmarks/kernels_gpu.py --modes amp --out "$(result_path kernels .json)" ;;
    shapes) run python benchmarks/kernel_shapes_gpu.py --out "$(result_path kernel_shapes .json)" ;;
    base) run "${step[@]}" --model mae_vit_base_patch16 ;;
    large) run "${step[@]}" --model mae_vit_large_patch16 ;;
    huge) run "${step[@]}" --model mae_vit_huge_patch14 ;;
    recipe) run python -m fastmae bench step --batch_size 64 --dtype bf16 --out_dir "$out" --model mae_vit_large_patch16 \
              --impl fastmae,fastmae+cudagraph,fastmae+compile,reference-style --compile_scope blocks ;;
    compile)
      for mode in default reduce-overhead max-autotune-no-cudagraphs; do
        run "${step[@]}" --model mae_vit_large_patch16 --impl fastmae+compile --compile_scope blocks --compile_mode "$mode"
      done ;;
    ablation) run "${step[@]}" --model mae_vit_large_patch16 --impl fastmae --kernels torch ;;
    table2) run python -m fastmae bench table2 --batch_size 256 --oom_fallback --dtype bf16 --out_dir "$out" ;;
    table2_compiled) run python -m fastmae bench table2 --compile --batch_size 256 --oom_fallback --dtype bf16 \
                       --out_dir "$out" ;;
    table2_cudagraph) run python -m fastmae bench table2 --cuda_graph --batch_size 256 --oom_fallback --dtype bf16 \
                        --out_dir "$out" ;;
    profile)
      for model_batch in mae_vit_base_patch16:256 mae_vit_large_patch16:256 mae_vit_huge_patch14:128; do
        run python -m fastmae profile --model "${model_batch%:*}" --batch_size "${model_batch#*:}" --dtype bf16 \
          --out_dir "$out"
      done ;;
    data) run python -m fastmae bench data --loaders cpu hybrid torchvision --device cuda --batch_size 256 \
            --json "$(result_path data .json)" --plot "$(result_path data .png)" ;;
    train)
      jpegs=$(mktemp -d) run_dir=$(mktemp -d)
      python -c "import os, sys, pathlib; from fastmae.data.synthetic import write_jpeg_folder
write_jpeg_folder(sys.argv[1], 5120, num_classes=16)
for f in list(pathlib.Path(sys.argv[1]).rglob('*.jpg')):
    for copy in range(1, 16): os.link(f, f.with_name(f'{f.stem}_copy{copy}{f.suffix}'))" "$jpegs"
      # hybrid (auto's choice without DALI): eager, replayed as a CUDA graph; cpu; hybrid compiled per block
      for run_name in hybrid hybrid_cudagraph cpu hybrid_compiled; do
        compiled=(--cuda_graph off)  # eager
        [[ $run_name == *_compiled ]] && compiled=(--compile --compile_scope blocks)
        [[ $run_name == *_cudagraph ]] && compiled=(--cuda_graph on)
        run python -m fastmae pretrain --data_path "$jpegs" --model mae_vit_base_patch16 --batch_size 256 \
          --norm_pix_loss --max_steps 240 --log_every 40 --save_every 1000000 --save_epochs 0 --output_dir "$run_dir/$run_name" \
          --data_loader "${run_name%_*}" --num_workers 16 --no_progress "${compiled[@]}"
        [ -f "$run_dir/$run_name/summary.json" ] &&
          cp "$run_dir/$run_name/summary.json" "$(result_path "train_mae_vit_base_patch16_$run_name" .json)"
      done
      rm -rf "$jpegs" "$run_dir" ;;
  esac
done
run python benchmarks/make_results_table.py --results_dir "$out"
exit $status
