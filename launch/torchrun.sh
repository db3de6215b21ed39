#!/usr/bin/env bash
# torchrun on one node or many: run once per node with the same --nodes/--master-addr/--master-port.
#   single node, 8 GPUs:   launch/torchrun.sh --config configs/385m.yaml --nproc-per-node 8 -- parallel.zero_stage=2
#   node 1 of 2:           launch/torchrun.sh --config C --nodes 2 --node-rank 1 --nproc-per-node 8 \
#                              --master-addr node001 --master-port 29500
# Options: see launch/launch.py (--dry-run prints the command, --cpu runs over gloo). Preflight first.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
if [[ -x "$HERE/../.venv/bin/python" && -z "${VIRTUAL_ENV:-}" ]]; then PYTHON="$HERE/../.venv/bin/python"; fi
exec "$PYTHON" "$HERE/launch.py" torchrun "$@"
