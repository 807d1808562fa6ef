#!/bin/bash
# Device run: long-K shapes with the split-K row-walk configs, determinism x100 and the untuned choice's cost,
# then the 80% batch-8 e2e point with each pass off.
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 70 python benchmarks/bench_kernels.py --models llama70b opt66b --layers down fc2 --m 1 8 --sparsity 0.8 0.9 \
  --references --tune-rep-ms 2 --out $OUT/longk > $OUT/longk.log 2>&1; grep "ours" $OUT/longk.log
timeout 60 python benchmarks/determinism.py > $OUT/determinism.log 2>&1; tail -9 $OUT/determinism.log
timeout 170 python benchmarks/bench_e2e.py --arch llama --layers 8 --sparsity 0.8 --batch 8 --new-tokens 128 \
  --variants '{"fuse_epilogues": false}' '{"fuse_siblings": false}' --out $OUT/e2e > $OUT/e2e.log 2>&1
tail -7 $OUT/e2e.log
