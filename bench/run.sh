#!/usr/bin/env bash
# Thin wrapper: `make bench` runs this. All the work is in run.py (stdlib-only Python);
# every knob is an environment variable, see bench/README.md.
#   PYTHON=/path/to/python   the project's venv python (default: $VENV/bin/python, VENV=.venv)
# The harness itself runs with the system python3 if it is >= 3.10, else with that venv python.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
harness_py=""
if command -v python3 >/dev/null 2>&1 &&
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  harness_py=python3
else
  for c in "${PYTHON:-}" "${VENV:-.venv}/bin/python" "$here/../${VENV:-.venv}/bin/python"; do
    if [[ -n $c && -x $c ]]; then harness_py=$c; break; fi
  done
fi
if [[ -z $harness_py ]]; then
  echo "bench: need python3 >= 3.10 or the project venv (PYTHON=/path/to/python)" >&2
  exit 2
fi
exec "$harness_py" "$here/run.py" "$@"
