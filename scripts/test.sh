#!/bin/bash
# scripts/test.sh: build everything (scripts/setup.sh), then run every test:
# unit tests, and integration tests that boot real node VMs on /dev/kvm.
# Without a usable /dev/kvm the integration tests fail; they are never skipped.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
start=$(date +%s)
scripts/setup.sh
[ -r /dev/kvm ] && [ -w /dev/kvm ] || echo "warning: /dev/kvm is not usable here: the KVM tests will fail" >&2
printf '\n== tests\n' >&2
cargo test --release --workspace --no-fail-fast "$@"
echo "scripts/test.sh: all tests passed in $(( $(date +%s) - start )) s" >&2
