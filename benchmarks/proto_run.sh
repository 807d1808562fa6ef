#!/bin/bash
# Device run: prototype row-walk sweep + ncu counters of each variant (qkv, 90%, M=1 and 8).
export PYTHONPATH=$PWD
mkdir -p $OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt
timeout 300 python benchmarks/proto_rowwalk.py --shapes qkv down --sparsity 0.8 0.9 --m 1 4 8 \
   --variants triton ptx triton_il ptx_il --unroll 2 4 2>&1 | tee $OUT/proto.log | grep -v "^WRONG\|^FAIL" 
grep -c "WRONG\|FAIL" $OUT/proto.log; grep "WRONG\|FAIL" $OUT/proto.log | head -5
timeout 200 ncu --clock-control none -k regex:"_proto_kernel|nvjet|gemv|gemm" \
  --metrics gpu__time_duration.sum,smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,dram__bytes_read.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_lg_cmd_read.sum,smsp__warps_active.avg.pct_of_peak_sustained_active,smsp__average_warp_latency_issue_stalled_long_scoreboard.ratio,smsp__average_warp_latency_issue_stalled_lg_throttle.ratio,smsp__average_warp_latency_issue_stalled_wait.ratio,l1tex__throughput.avg.pct_of_peak_sustained_active,smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct,smsp__warp_issue_stalled_lg_throttle_per_warp_active.pct,smsp__warp_issue_stalled_no_instruction_per_warp_active.pct,smsp__warp_issue_stalled_selected_per_warp_active.pct,smsp__warp_issue_stalled_short_scoreboard_per_warp_active.pct,smsp__warp_issue_stalled_math_pipe_throttle_per_warp_active.pct,smsp__warp_issue_stalled_mio_throttle_per_warp_active.pct,smsp__warp_issue_stalled_wait_per_warp_active.pct,smsp__warp_issue_stalled_not_selected_per_warp_active.pct \
  python benchmarks/proto_rowwalk.py --profile --shapes qkv --sparsity 0.9 --m 1 8 --unroll 2 > $OUT/ncu.txt 2>&1
grep -E "_proto_kernel|nvjet|gemv|gemm|duration|inst_executed|issue_active|dram__bytes|requests|sectors|wavefronts|warps_active|stalled|throughput" $OUT/ncu.txt | sed 's/  */ /g' | head -120
