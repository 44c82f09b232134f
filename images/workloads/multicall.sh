#!/bin/sh
# images/workloads/multicall.sh OUT
# Links every workload into ONE static multi-call binary OUT (dispatching on
# the basename of argv[0], like busybox): the initramfs then carries one copy
# of static glibc (~0.7 MB) instead of one per workload, since each MB of
# initramfs costs ~1.4 s of guest boot. images/build.sh installs it as
# /bin/pmivmm-workloads with a symlink /bin/<workload> per workload.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: multicall.sh OUT}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
names=""
for src in "$HERE"/*.c; do
	name=$(basename "$src" .c)
	${CC:-cc} -c -O2 -Wall -Wextra -pthread "-Dmain=wl_${name}_main" -o "$TMP/$name.o" "$src"
	names="$names $name"
done
{
	echo '#include <stdio.h>'
	echo '#include <string.h>'
	for n in $names; do echo "int wl_${n}_main(int, char **);"; done
	echo 'int main(int argc, char **argv) {'
	echo '	const char *b = strrchr(argv[0], 47); b = b ? b + 1 : argv[0];'
	for n in $names; do echo "	if (!strcmp(b, \"$n\")) return wl_${n}_main(argc, argv);"; done
	printf '\tfprintf(stderr, "pmivmm-workloads: unknown workload %%s (one of:%s)\\n", b);\n' "$names"
	echo '	return 127;'
	echo '}'
} > "$TMP/main.c"
${CC:-cc} -static -O2 -pthread -o "$TMP/multi" "$TMP"/*.o "$TMP/main.c"
strip "$TMP/multi"
mv "$TMP/multi" "$OUT"
echo "$names"
