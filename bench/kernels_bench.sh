#!/bin/bash
# bench/kernels_bench.sh — builds bench/kernels_bench.cpp (the header's commands) into build/bench and runs it.
# Owner: kernels. Usage: bench/kernels_bench.sh [n_threads=all] [cold|hot] [passes=3] [formats]
#   e.g. Gemma 3 270M's shapes, the Q4_K_M formats exact and fast, 2 threads, weights from DRAM:
#   LMX_BENCH_SHAPES=1024x640,256x640,2048x640,640x1024,640x2048,262144x640 \
#     bench/kernels_bench.sh 2 cold 3 q8_0*,q4_1,q4_1*,q5_0,q5_0*,q4_K,q4_K*,q6_K,q6_K*
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
S=$root/engine/src
out=$root/build/bench
mkdir -p "$out"
F=(-O3 -std=gnu++17 -I"$S")
flock /tmp/lmx-build.lock bash -c "
  set -e
  g++ ${F[*]} -c $S/kernels/kernels_avx2.cpp -mavx2 -mfma -mf16c -o $out/kernels_avx2.o
  g++ ${F[*]} -c $S/kernels/kernels_avx512.cpp -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 \
      -mavx512vnni -mfma -mf16c -mavx2 -o $out/kernels_avx512.o
  g++ ${F[*]} $root/bench/kernels_bench.cpp $S/kernels/dispatch.cpp $S/kernels/reference.cpp $S/kernels/quants.cpp \
      $S/threadpool.cpp $S/common.cpp $out/kernels_avx2.o $out/kernels_avx512.o -pthread -o $out/kernels_bench
"
uptime
"$out/kernels_bench" "$@"
uptime
