#!/bin/bash
# Device run: GPU tests, then the kernel table (LLaMA-7B fp16 full; bf16 and larger models on a subset).
export PYTHONPATH=$PWD
mkdir -p $OUT
FLASHLLM_TEST_GPU=1 timeout 110 python -m pytest -q -x tests/gpu/test_gpu.py > $OUT/gpu_tests.log 2>&1; tail -3 $OUT/gpu_tests.log
timeout 250 python benchmarks/bench_kernels.py --models llama7b --m 1 2 4 8 16 32 64 --sparsity 0.5 0.7 0.8 0.9 \
  --references 2:4 --tune-rep-ms 2 --out $OUT/fp16 > $OUT/bench_fp16.log 2>&1; tail -22 $OUT/bench_fp16.log
timeout 80 python benchmarks/bench_kernels.py --models llama7b --m 1 4 8 --sparsity 0.8 0.9 --dtype bfloat16 \
  --references --tune-rep-ms 2 --out $OUT/bf16 > $OUT/bench_bf16.log 2>&1; tail -8 $OUT/bench_bf16.log
timeout 100 python benchmarks/bench_kernels.py --models llama13b llama70b opt66b --m 1 8 --sparsity 0.8 0.9 \
  --references --tune-rep-ms 2 --out $OUT/big > $OUT/bench_big.log 2>&1; tail -8 $OUT/bench_big.log
