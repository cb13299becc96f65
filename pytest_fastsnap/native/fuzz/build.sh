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
# The parser: mapped-ram streams, and libvirt save images around them.
PARSER=()
for f in mr_format mr_libvirt; do
    # shellcheck disable=SC2086  # CFLAGS and LIB_FUZZING_ENGINE are word lists
    $CC $CFLAGS -std=c11 -c "$NATIVE/$f.c" -o "$OUT/$f.o"
    PARSER+=("$OUT/$f.o")
done
# shellcheck disable=SC2086
$CC $CFLAGS -std=c11 "$NATIVE/fuzz_format.c" "${PARSER[@]}" $LIB_FUZZING_ENGINE \
    -o "$OUT/fuzz_format"
# shellcheck disable=SC2086
$CC $CFLAGS -std=c11 -pthread "$NATIVE/fuzz_bridge_rp.c" "$NATIVE/bridge_snap.c" \
    "$NATIVE/mr_core.c" "$NATIVE/mr_local.c" "$NATIVE/mr_sha256.c" "${PARSER[@]}" \
    $LIB_FUZZING_ENGINE -lm -o "$OUT/fuzz_bridge_rp"
rm -f "${PARSER[@]}"
cp "$HERE/mapped_ram.dict" "$OUT/fuzz_format.dict"
