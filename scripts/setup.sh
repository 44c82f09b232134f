#!/bin/bash
# scripts/setup.sh: build everything a node needs, reusing what is cached.
#   - Debian packages for the kernel and image builds (installed when missing)
#   - the guest kernel (kernel-config/build.sh, cached in ~/.cache/pmivmm/kernel/)
#   - the pmivmm VMM (cargo, release profile)
#   - the initramfs with busybox and the static guest agent (images/build.sh)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
step() { printf '\n== %s\n' "$*" >&2; }

command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
# Guest binaries are static glibc builds for this target.
if command -v rustup >/dev/null; then
	rustup target list --installed | grep -qx x86_64-unknown-linux-gnu || rustup target add x86_64-unknown-linux-gnu
fi

step "guest kernel (cached build is reused; a fresh build takes ~5 minutes)"
kdir=$(kernel-config/build.sh)
echo "kernel: $kdir/vmlinux" >&2

step "pmivmm (cargo build --release)"
cargo build --release --bins

step "initramfs"
images/build.sh >/dev/null
