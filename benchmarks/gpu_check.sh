#!/usr/bin/env bash
# The one prepared check for a GPU machine: install the project into the machine's own python,
# record the GPU, run the sm_90/sm_80 compile-fitness check, the test suite's op tests on the GPU
# (bf16 included, the interpreter off), the side-by-side op benchmarks at the canonical shapes
# (training and decode shapes, every low-rank path), and the LRC step benchmark. Logs, JSONL, CSVs
# and plots go under $OUT (default runs/gpu). Every step has its own time limit, so one slow step
# cannot cost the others.
#
#   bash benchmarks/gpu_check.sh            # liger-kernel rows too if its wheel sits in .whl/
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# 0. compile fitness of every kernel config for sm_90 and sm_80 (the same check CI runs)
timeout 300 python3 -m benchmarks.compile_check --out "$OUT" 2>&1 | tee "$OUT/compile_check.log" | tail -8

# 1. correctness on the GPU (bf16 added automatically by tests/conftest.py when CUDA is present)
timeout 240 python3 -m pytest -q -x tests/test_lowrank_linear.py tests/test_clone_loss.py tests/test_kd_loss.py \
  tests/test_scale.py tests/test_lrc.py -k "not minilm and not ddp" 2>&1 | tee "$OUT/gpu_tests.log" | tail -5

# 2. side-by-side op benchmarks at the canonical shapes, decode shapes included (CSV + PNG + table)
timeout 300 python3 -m lrkd_fast.cli bench --device cuda --full --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60

# 3. one LRC training step at the canonical widths, official-code style vs lrkd_fast
timeout 180 python3 -m benchmarks.lrc_step --layers 1 2 --csv "$OUT/lrc_step.csv" 2>&1 | tee "$OUT/lrc_step.log" | tail -15
