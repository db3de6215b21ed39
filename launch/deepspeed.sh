#!/usr/bin/env bash
# The DeepSpeed launcher (pdsh/ssh to every host of the hostfile; lines "host slots=N"):
#   launch/deepspeed.sh --hostfile hostfile --config configs/1b.yaml -- parallel.zero_stage=3
# --dry-run prints the deepspeed command; the preflight checks the layout against the hostfile's slots.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
if [[ -x "$HERE/../.venv/bin/python" && -z "${VIRTUAL_ENV:-}" ]]; then PYTHON="$HERE/../.venv/bin/python"; fi
exec "$PYTHON" "$HERE/launch.py" deepspeed "$@"
