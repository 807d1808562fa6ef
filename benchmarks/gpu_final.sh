#!/bin/bash
# Device run: end-to-end decode (8 LLaMA-7B layers, 80/90%, batch 1/8) and initcheck of every kernel config.
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 400 python benchmarks/bench_e2e.py --arch llama --layers 8 --sparsity 0.8 0.9 --batch 1 8 --new-tokens 128 \
  --out $OUT > $OUT/e2e.log 2>&1
tail -16 $OUT/e2e.log
timeout 60 python benchmarks/sanitize.py --under-sanitizer --tools initcheck --set sanitize-small \
  --dtypes float16 > $OUT/sanitize.log 2>&1; tail -4 $OUT/sanitize.log
