#!/bin/bash
# Device run: prototype row-walk sweep + ncu counters of each variant (qkv, 90%, M=1 and 8).
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 330 python benchmarks/proto_rowwalk.py --shapes qkv o down --sparsity 0.7 0.8 0.9 --m 1 2 4 8 \
   --variants triton bal ptxbal --unroll 2 4 2>&1 | tee $OUT/proto.log | grep -v "^WRONG\|^FAIL"
grep -c "WRONG\|FAIL" $OUT/proto.log; grep "WRONG\|FAIL" $OUT/proto.log | head -5
timeout 120 ncu --clock-control none -k regex:"_proto_kernel|_bal_kernel" \
  --metrics gpu__time_duration.sum,smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,dram__bytes_read.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__throughput.avg.pct_of_peak_sustained_active,smsp__warps_active.avg.pct_of_peak_sustained_active,smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct,smsp__warp_issue_stalled_lg_throttle_per_warp_active.pct,smsp__warp_issue_stalled_not_selected_per_warp_active.pct,smsp__warp_issue_stalled_math_pipe_throttle_per_warp_active.pct \
  python benchmarks/proto_rowwalk.py --profile --shapes qkv --sparsity 0.9 --m 1 8 --unroll 2 --variants triton bal ptxbal > $OUT/ncu.txt 2>&1
grep -E "_proto_kernel|_bal_kernel|duration|inst_executed|issue_active|dram__bytes|requests|sectors|warps_active|stalled|throughput" $OUT/ncu.txt | sed 's/  */ /g' | head -80
