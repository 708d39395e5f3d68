# Sourced by scripts/demo.sh and scripts/test.sh: make sure a Python environment with logix and
# its dependencies exists, reusing whatever is already installed. Set LOGIX_VENV to use another
# environment directory, or LOGIX_PYTHON to use an existing interpreter as it is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${LOGIX_PYTHON:-}" ]; then
  PY="$LOGIX_PYTHON"
else
  VENV="${LOGIX_VENV:-$ROOT/.venv}"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "logix: creating the Python environment $VENV" >&2
    python3 -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
fi
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v '^WARNING: Location' >&2 || true; }
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build where a CPU wheel will do.
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "logix: installing torch (${LOGIX_TORCH:-torch==2.13.0})" >&2
  pip_install "${LOGIX_TORCH:-torch==2.13.0}"
fi
EXTRAS="${LOGIX_EXTRAS:-dev,plot,hf,pandas,index,fast}"
if ! "$PY" -c "import logix, safetensors, numpy, yaml, rich, pytest, ruff, matplotlib, transformers, accelerate, datasets, pandas, faiss, crc32c; assert logix.__file__.startswith('$ROOT')" 2>/dev/null; then
  echo "logix: installing logix[$EXTRAS] (editable)" >&2
  pip_install -e ".[$EXTRAS]"
fi
"$PY" -c "import logix" || { echo "logix: installation failed" >&2; exit 1; }
