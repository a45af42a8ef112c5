#!/bin/sh
# run_cpu_bench.sh — build the library objects without CUDA and run the CPU
# benchmarks of tests/bench against them.  Arguments go to bench_matmul
# ([n] [runs]).  BUILD picks the object folder (default build-cpu).
set -e
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build-cpu}
var() { make -s CUDA=0 BUILD="$BUILD" --eval 'print-%: ; @echo $($*)' "print-$1"; }
# The runtime objects (no Lua bindings: benchmarks call host/ directly)
# and the link line are the Makefile's own.
objs=$(var LIB_OBJS | tr ' ' '\n' | grep -v '/bindings/' | tr '\n' ' ')
make -s -j2 CUDA=0 BUILD="$BUILD" $objs
mkdir -p "$BUILD/bench"
${CC:-cc} $(var CFLAGS) -o "$BUILD/bench/bench_matmul" tests/bench/bench_matmul.c $objs $(var LDLIBS)
"$BUILD/bench/bench_matmul" "$@"
