#!/usr/bin/env bash
# The one entry point: creates .venv with the pinned versions on first use, then runs a job.
#   ./dev.sh demo [args]   the main job (delta-tune the real MiniLM on real tweets)
#   ./dev.sh test [args]   the test suite
#   ./dev.sh bench [args]  the benchmark suite
#   ./dev.sh python [args] the project's Python
set -euo pipefail
cd "$(dirname "$0")"
venv=.venv
stamp="$venv/.installed-$(cat requirements.lock requirements-nodeps.lock pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setting up $venv (pinned versions; torch==2.13.0 CPU build) ..." >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r requirements.lock
  "$venv/bin/python" -m pip install -q --no-deps -r requirements-nodeps.lock
  # DeepSpeed builds from source: no build isolation (it would fetch another torch), no ops compiled now
  DS_BUILD_OPS=0 "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation deepspeed==0.19.8
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
job="${1:-}"
[ $# -gt 0 ] && shift
case "$job" in
  demo) exec "$venv/bin/python" -m opendelta demo "$@" ;;
  test)
    # a hash seed of our own choosing unless the caller set one: every run tries another set/dict-of-str
    # order, and the printed value (with pytest-randomly's --randomly-seed) replays a failing run exactly
    export PYTHONHASHSEED="${PYTHONHASHSEED:-$(( (RANDOM << 15 | RANDOM) % 4294967296 ))}"
    echo "PYTHONHASHSEED=$PYTHONHASHSEED" >&2
    exec "$venv/bin/python" -m pytest -n 2 "$@" ;;
  bench) exec "$venv/bin/python" -m benchmarks "$@" ;;
  python) exec "$venv/bin/python" "$@" ;;
  *) echo "usage: ./dev.sh demo|test|bench|python [args]" >&2; exit 2 ;;
esac
