#!/bin/bash
# scripts/node.sh [pmivmm node options]: build what is missing, then boot a
# node VM in this terminal (Ctrl-A x stops it). Example:
#   scripts/node.sh --name n1 --mem 256M
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
"$ROOT/scripts/setup.sh"
exec "$ROOT/target/release/pmivmm" --node "$@"
