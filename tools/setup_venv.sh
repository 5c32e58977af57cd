#!/usr/bin/env bash
# Create .venv with CPython 3.10 and the pinned environment, then install rcdet (editable).
# Called by `make setup`; the Makefile's stamp file makes a second run a no-op.
set -euo pipefail
VENV=${1:-.venv}

find_python310() {
  # On pyenv machines `python3.10` on PATH can be a shim that fails unless selected: run it.
  if command -v python3.10 >/dev/null 2>&1 && python3.10 -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1; then
    command -v python3.10; return 0
  fi
  local roots=()
  command -v pyenv >/dev/null 2>&1 && roots+=("$(pyenv root)")
  roots+=("${PYENV_ROOT:-$HOME/.pyenv}")
  for root in "${roots[@]}"; do
    for py in "$root"/versions/3.10.*/bin/python3.10; do
      if [ -x "$py" ] && "$py" -c 'import sys' >/dev/null 2>&1; then echo "$py"; return 0; fi
    done
  done
  return 1
}

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
  echo "[setup] reusing $VENV"
else
  PY=$(find_python310) || {
    echo "error: CPython 3.10 not found. Install it (e.g. 'pyenv install 3.10' or 'apt-get install python3.10 python3.10-venv') and run 'make setup' again." >&2
    exit 1
  }
  echo "[setup] creating $VENV with $PY"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi
# setuptools is pinned in requirements.txt (detectron2 needs its pkg_resources): not upgraded here.
"$VENV/bin/python" -m pip install --quiet --upgrade pip wheel
"$VENV/bin/python" -m pip install -r requirements.txt
"$VENV/bin/python" -m pip install --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import rcdet, detectron2, torch; print(f'[setup] ok: torch {torch.__version__}, detectron2 {detectron2.__version__}, rcdet {rcdet.__version__}')"
