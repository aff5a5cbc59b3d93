# Sourced by the launchers: the project's Python, the rank count (NPROC, default: one per visible
# GPU, else 1) and the usage check. Not meant to be run on its own.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC:-0}" -gt 0 ] || NPROC=1
fi
if [ $# -lt 1 ]; then
  echo "usage: NPROC=N $0 SPEC.yaml --stage NAME --out DIR [--resume]" >&2
  exit 2
fi
