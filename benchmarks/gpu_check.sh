#!/bin/bash
# Device run: GPU correctness of every kernel family, then every config checked plain and under compute-sanitizer.
export PYTHONPATH=$PWD
mkdir -p $OUT
FLASHLLM_TEST_GPU=1 timeout 180 python -m pytest -q -x tests/gpu 2>&1 | tail -8
timeout 120 python benchmarks/sanitize.py --set sanitize > $OUT/sanitize_check.log 2>&1; tail -4 $OUT/sanitize_check.log
timeout 200 python benchmarks/sanitize.py --under-sanitizer --tools memcheck racecheck --set sanitize-small > $OUT/sanitize.log 2>&1; tail -8 $OUT/sanitize.log
