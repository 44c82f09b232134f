#!/bin/sh
# images/workloads/build.sh OUTDIR
# Builds the checkpoint/restore test workloads as static binaries into
# OUTDIR. Each prints progress and a final `RESULT ...` line that an
# uninterrupted run prints identically.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: build.sh OUTDIR}
mkdir -p "$OUT"
for src in "$HERE"/*.c; do
	name=$(basename "$src" .c)
	${CC:-cc} -static -O2 -Wall -Wextra -pthread -o "$OUT/$name.tmp" "$src"
	mv "$OUT/$name.tmp" "$OUT/$name"
done
