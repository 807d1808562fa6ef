#!/bin/bash
# Device run: GPU correctness of every kernel family, a short prototype comparison, sanitizer on every config.
export PYTHONPATH=$PWD
mkdir -p $OUT
FLASHLLM_TEST_GPU=1 timeout 180 python -m pytest -q -x tests/gpu 2>&1 | tail -8
timeout 100 python benchmarks/proto_rowwalk.py --shapes qkv o --sparsity 0.8 0.9 --m 4 8 \
   --variants ptxbal ptxbal_x32 --unroll 2 2>&1 | tee $OUT/proto.log | grep -v "^WRONG\|^FAIL"
grep -c "WRONG\|FAIL" $OUT/proto.log
timeout 120 python benchmarks/sanitize.py --set sanitize > $OUT/sanitize_check.log 2>&1; tail -4 $OUT/sanitize_check.log
timeout 200 python benchmarks/sanitize.py --under-sanitizer --tools memcheck racecheck > $OUT/sanitize.log 2>&1; tail -8 $OUT/sanitize.log
