#!/bin/bash
# Device run: prototype row-walk sweep (balanced PTX walk with L2 prefetch-size hints).
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 400 python benchmarks/proto_rowwalk.py --shapes qkv o down --sparsity 0.8 0.9 --m 1 4 8 \
   --variants triton ptxbal ptxbal128 ptxbal256 --unroll 2 2>&1 | tee $OUT/proto.log | grep -v "^WRONG\|^FAIL"
grep -c "WRONG\|FAIL" $OUT/proto.log; grep "WRONG\|FAIL" $OUT/proto.log | head -5
