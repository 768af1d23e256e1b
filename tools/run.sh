#!/usr/bin/env bash
# Set up (first use) and run: `bash tools/run.sh demo` or `bash tools/run.sh test [pytest args]`.
# Creates .venv with Python 3.12 and installs the project with its test extras when
# pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local c
  for c in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  echo "error: Python 3.12 not found (megatron-core >= 0.17 needs it); install python3.12" >&2
  return 1
}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $(find_python)" >&2
  "$(find_python)" -m venv .venv
fi
stamp=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
  started=$SECONDS
  echo "setup: installing mimo-ckpt with torch, megatron-core, tensorstore and the test tools into .venv" >&2
  echo "setup: (a few minutes on first use; one line per package pip fetches)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  set +e
  .venv/bin/python -m pip install --progress-bar off -e '.[test]' 2>&1 | tee .venv/install.log \
    | grep --line-buffered '^Collecting' | cut -c1-100 >&2
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" != 0 ]; then
    tail -n 20 .venv/install.log >&2
    echo "setup: pip failed (the whole log: .venv/install.log)" >&2
    exit 1
  fi
  echo "$stamp" > .venv/.installed
  echo "setup: done in $((SECONDS - started)) s; .venv/bin has mimo-ckpt, torchrun and python (source .venv/bin/activate)" >&2
fi

what=${1:-}
shift || true
case "$what" in
  demo) exec .venv/bin/python examples/demo.py "$@" ;;
  test) exec .venv/bin/python -m pytest tests "$@" ;;
  *) echo "usage: bash tools/run.sh demo|test [args]" >&2; exit 2 ;;
esac
