#!/bin/bash
# Device run: end-to-end decode with each graph pass / mode toggled, then compute-sanitizer on the small set.
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 340 python benchmarks/bench_e2e.py --arch llama --layers 4 --sparsity 0.8 --batch 1 8 --new-tokens 64 \
  --variants '{"fuse_epilogues": false}' '{"deterministic": true}' --out $OUT/e2e > $OUT/e2e.log 2>&1
tail -13 $OUT/e2e.log
timeout 170 python benchmarks/sanitize.py --under-sanitizer --tools memcheck racecheck --set sanitize-small \
  --dtypes float16 > $OUT/sanitize.log 2>&1; tail -6 $OUT/sanitize.log
