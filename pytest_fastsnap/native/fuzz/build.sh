#!/bin/bash
# Build the libFuzzer harnesses the way OSS-Fuzz / ClusterFuzzLite expect:
# they set CC, CFLAGS (sanitizers, coverage), LIB_FUZZING_ENGINE, SRC and OUT.
# `fastsnap fuzz loader` runs this same script with its own values, e.g.
#   CC=clang CFLAGS="-O1 -g -fsanitize=address,undefined -fsanitize=fuzzer-no-link" \
#   LIB_FUZZING_ENGINE=-fsanitize=fuzzer OUT=/tmp/out bash build.sh
set -eu
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NATIVE="${NATIVE_SRC:-$HERE/../src}"
OUT="${OUT:?set OUT to the output directory}"
mkdir -p "$OUT"
# Every source of the loader but main() and the bridge (which fuzz_bridge_rp.c
# includes), in one archive: each harness links only the members it needs.
OBJS=()
for src in "$NATIVE"/mr_*.c "$NATIVE"/bridge_snap.c "$NATIVE"/bridge_resume.c \
           "$NATIVE"/bridge_ws.c "$NATIVE"/bridge_net.c "$NATIVE"/bridge_preempt.c; do
    case "$(basename "$src")" in mr_main.c) continue ;; esac
    obj="$OUT/$(basename "$src" .c).o"
    # shellcheck disable=SC2086  # CFLAGS and LIB_FUZZING_ENGINE are word lists
    $CC $CFLAGS -std=c11 -pthread -c "$src" -o "$obj"
    OBJS+=("$obj")
done
rm -f "$OUT/libmr.a"
ar rcs "$OUT/libmr.a" "${OBJS[@]}"
rm -f "${OBJS[@]}"
# shellcheck disable=SC2086
$CC $CFLAGS -std=c11 "$NATIVE/fuzz_format.c" "$OUT/libmr.a" $LIB_FUZZING_ENGINE -lm \
    -o "$OUT/fuzz_format"
# shellcheck disable=SC2086
$CC $CFLAGS -std=c11 -pthread "$NATIVE/fuzz_bridge_rp.c" "$OUT/libmr.a" \
    $LIB_FUZZING_ENGINE -lm -o "$OUT/fuzz_bridge_rp"
# shellcheck disable=SC2086
$CC $CFLAGS -std=c11 "$NATIVE/fuzz_bridge_ws.c" "$OUT/libmr.a" $LIB_FUZZING_ENGINE -lm \
    -o "$OUT/fuzz_bridge_ws"
rm -f "$OUT/libmr.a"
cp "$HERE/mapped_ram.dict" "$OUT/fuzz_format.dict"
