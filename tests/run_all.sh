#!/bin/sh
# Run every C test program and the Lua suite; print one total line
# "N passed, N failed" last, exit non-zero if anything failed.
BUILD=${BUILD:-build}
total_pass=0; total_fail=0
run_one() {
    name=$1; shift
    out=$("$@" 2>&1); rc=$?
    line=$(printf '%s\n' "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed$' | tail -1)
    if [ -z "$line" ]; then
        printf '%s\n' "$out" | tail -20
        echo "== $name: crashed or printed no summary (exit $rc)"
        total_fail=$((total_fail + 1)); return
    fi
    p=${line%% passed*}; f=${line#*passed, }; f=${f%% failed}
    if [ "$f" != 0 ] || [ $rc != 0 ]; then printf '%s\n' "$out" | grep -E 'FAIL|Error|error' | head -40; fi
    [ $rc != 0 ] && [ "$f" = 0 ] && f=1
    echo "== $name: $p passed, $f failed"
    total_pass=$((total_pass + p)); total_fail=$((total_fail + f))
}
for t in "$BUILD"/tests/test_*; do
    [ -x "$t" ] || continue
    run_one "$(basename "$t")" "$t"
done
MOONLIT_BIN="$BUILD/moonlit"; export MOONLIT_BIN
run_one "lua suite" "$BUILD/moonlit" tests/lua/run.lua
run_one "sd1-tiny fixture" "$BUILD/moonlit" scripts/verify_fixture.lua tests/fixtures/sd1-tiny
run_one "sd2-tiny fixture" "$BUILD/moonlit" scripts/verify_fixture.lua tests/fixtures/sd2-tiny
echo "$total_pass passed, $total_fail failed"
[ "$total_fail" = 0 ]
