#!/bin/bash
# kernel-config/build.sh [--print-dir]
#
# Builds the pmivmm guest kernel (an ELF vmlinux, no modules) from Debian's
# linux-source-6.1 package, with the patches in patches/ and the config
# fragment pmivmm.fragment merged on top of `make tinyconfig`.
#
# The result is cached outside the clone, keyed by a hash of the kernel source
# package version, the fragment, the patches and this script:
#   ${PMIVMM_CACHE:-$HOME/.cache/pmivmm}/kernel/<key>/{vmlinux,System.map,config}
# and ${PMIVMM_CACHE}/kernel/current points at the newest build. A cached
# build is reused; the script prints the directory that holds vmlinux.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${PMIVMM_CACHE:-$HOME/.cache/pmivmm}
JOBS=${JOBS:-$(nproc)}
TARBALL=/usr/src/linux-source-6.1.tar.xz

"$HERE/../scripts/ensure-packages.sh" linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev

srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { echo "$srcver"; cat "$HERE/pmivmm.fragment" "$HERE"/patches/*.patch "$HERE/build.sh"; } | sha256sum | cut -c1-16)
OUT="$CACHE/kernel/$key"
if [ -f "$OUT/vmlinux" ]; then
	ln -sfn "$key" "$CACHE/kernel/current"
	echo "$OUT"
	exit 0
fi

WORK="$CACHE/kbuild"
SRC="$WORK/linux-$key"
mkdir -p "$WORK"
rm -rf "$WORK"/linux-* "$WORK/extract"
echo "kernel: extracting linux-source-6.1 $srcver (cache key $key)" >&2
mkdir "$WORK/extract"
tar -C "$WORK/extract" -xf "$TARBALL"
mv "$WORK/extract/linux-source-6.1" "$SRC"
rmdir "$WORK/extract"

cd "$SRC"
for p in "$HERE"/patches/*.patch; do
	echo "kernel: applying $(basename "$p")" >&2
	patch -p1 --forward --no-backup-if-mismatch --quiet < "$p"
done

make tinyconfig > /dev/null
KCONFIG_CONFIG=.config ./scripts/kconfig/merge_config.sh -m .config "$HERE/pmivmm.fragment" > /dev/null
make olddefconfig > /dev/null

# Every line of the fragment must survive dependency resolution.
bad=0
while read -r l; do
	case "$l" in
	CONFIG_*=*) grep -qx -- "$l" .config || { echo "kernel config: wanted '$l', got '$(grep -E "^(# )?${l%%=*}[= ]" .config || echo unset)'" >&2; bad=1; } ;;
	"# CONFIG_"*" is not set") o=${l#\# }; o=${o%% *}; ! grep -q "^$o=" .config || { echo "kernel config: wanted $o unset" >&2; bad=1; } ;;
	esac
done < "$HERE/pmivmm.fragment"
[ $bad = 0 ] || exit 1

echo "kernel: make -j$JOBS vmlinux (about 4-5 minutes on 2 cores)" >&2
make -j"$JOBS" vmlinux > "$WORK/make.log" 2>&1 || { tail -40 "$WORK/make.log" >&2; exit 1; }

mkdir -p "$OUT.tmp"
cp vmlinux System.map "$OUT.tmp/"
cp .config "$OUT.tmp/config"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
ln -sfn "$key" "$CACHE/kernel/current"
cd /
rm -rf "$SRC"
echo "$OUT"
