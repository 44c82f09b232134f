#!/bin/bash
# images/build.sh [OUT.cpio]
#
# Builds the node initramfs: an UNCOMPRESSED newc cpio (the guest kernel has no
# decompressors, and unpacking costs ~1.4 s per MB in the emulated guest
# kernel on the development hosts, so it is kept small) holding
#   /bin/busybox (Debian busybox-static), its applet list and a few links,
#   /sbin/pmivmm-agent (the static guest agent, built here),
#   /init: mounts /proc, /sys, /dev and execs the agent,
#   /bin/pmivmm-workloads + /bin/<workload> links (images/workloads/multicall.sh).
# Default output: ${PMIVMM_CACHE:-$HOME/.cache/pmivmm}/initramfs.cpio
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CACHE=${PMIVMM_CACHE:-$HOME/.cache/pmivmm}
OUT=$(realpath -m "${1:-$CACHE/initramfs.cpio}")
TARGET=x86_64-unknown-linux-gnu

"$ROOT/scripts/ensure-packages.sh" busybox-static cpio file

echo "images: building the static guest agent" >&2
# --target keeps crt-static away from build scripts and proc macros.
(cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
	cargo build --quiet --release -p pmivmm-agent --target "$TARGET")
AGENT="$ROOT/target/$TARGET/release/pmivmm-agent"
if ! file -b "$AGENT" | grep -q "static"; then
	echo "images: $AGENT is not static" >&2
	exit 1
fi

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,root,etc,run}
cp /bin/busybox "$STAGE/bin/busybox"
# No symlink per applet (each costs a path walk and an inode while the
# emulated guest kernel unpacks the cpio: ~270 of them took seconds of boot):
# the agent runs a command it cannot find in PATH through busybox if it is in
# this list, and busybox sh runs applets itself. Links only for the paths that
# scripts name directly (#! lines, rdinit=).
/bin/busybox --list > "$STAGE/etc/busybox.applets"
for a in bin/sh bin/ash bin/true bin/false usr/bin/env; do
	ln -sf /bin/busybox "$STAGE/$a"
done
install -m 755 "$AGENT" "$STAGE/sbin/pmivmm-agent"
strip "$STAGE/sbin/pmivmm-agent"
install -m 755 "$HERE/init" "$STAGE/init"
# The checkpoint/restore test workloads: one static multi-call binary
# (~0.9 MB, ~1.2 s of boot) and a /bin/<name> symlink per workload.
echo "images: building the test workloads" >&2
for w in $("$HERE/workloads/multicall.sh" "$STAGE/bin/pmivmm-workloads"); do
	ln -sf pmivmm-workloads "$STAGE/bin/$w"
done

mkdir -p "$(dirname "$OUT")"
# The same binary on the host: `pmivmm bench guest` runs guestbench on both.
cp "$STAGE/bin/pmivmm-workloads" "$(dirname "$OUT")/pmivmm-workloads"
(cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 > "$OUT.tmp")
mv "$OUT.tmp" "$OUT"
echo "images: $OUT ($(du -k "$OUT" | cut -f1) KiB)" >&2
echo "$OUT"
