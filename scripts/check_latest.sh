#!/usr/bin/env bash
# Upstream drift, caught on purpose (not part of CI): a throw-away virtual environment with the newest releases
# that pyproject.toml allows (what `pip install vlmtune` gets today), the packages that moved against the lock
# (constraints.txt), and the test suite run against them.
#
#   scripts/check_latest.sh                  newest releases inside pyproject.toml's ranges
#   UNCAPPED=1 scripts/check_latest.sh       also the newest transformers / peft / datasets / accelerate /
#                                            tokenizers / huggingface-hub beyond the ranges' upper bounds
#   scripts/check_latest.sh --update-lock    if the suite passes, write constraints.txt from that environment
#   extra arguments go to pytest, e.g. scripts/check_latest.sh tests/test_families.py -x
#
# torch and torchvision stay at the lock's pair unless TORCH_LATEST=1 (a new CUDA build is several GB).
set -uo pipefail
cd "$(dirname "$0")/.."
update_lock=0
if [ "${1:-}" = "--update-lock" ]; then update_lock=1; shift; fi
work=$(mktemp -d /tmp/vlmtune-latest.XXXXXX)
venv="$work/venv"
echo "check_latest: building $venv"
"${PYTHON:-python3}" -m venv "$venv" || exit 1
pip_=("$venv/bin/python" -m pip install -q)
if [ "${TORCH_LATEST:-0}" = 1 ]; then "${pip_[@]}" torch torchvision || exit 1
else "${pip_[@]}" $(grep -E '^(torch|torchvision)==' constraints.txt) || exit 1; fi
"${pip_[@]}" --upgrade --upgrade-strategy eager -e ".[dev]" || exit 1
if [ "${UNCAPPED:-0}" = 1 ]; then
  "${pip_[@]}" --upgrade --no-deps transformers peft datasets accelerate tokenizers huggingface-hub || exit 1
fi

"$venv/bin/python" -m pip freeze --exclude-editable | sed -E 's/\+[a-z0-9.]+$//' > "$work/latest.txt"
echo
echo "check_latest: packages that moved against constraints.txt (lock -> newest):"
"$venv/bin/python" - constraints.txt "$work/latest.txt" <<'PY'
import sys

def read(path):
    pins = {}
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#") and "==" in line:
            name, version = line.split("==", 1)
            pins[name.lower().replace("_", "-")] = version
    return pins

lock, latest = read(sys.argv[1]), read(sys.argv[2])
moved = [f"  {n}: {lock.get(n, '(new)')} -> {v}" for n, v in sorted(latest.items()) if lock.get(n) != v]
gone = [f"  {n}: {v} -> (not installed)" for n, v in sorted(lock.items()) if n not in latest]
print("\n".join(moved + gone) or "  none")
PY

echo
echo "check_latest: running the suite"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$work/pytest.log" | tail -40
status=${PIPESTATUS[0]}
echo
if [ "$status" = 0 ]; then
  echo "check_latest: the suite passes on the newest releases"
  [ "$update_lock" = 1 ] && bash scripts/lock.sh "$venv"
else
  echo "check_latest: FAILED with the newest releases (moved packages above; the log: $work/pytest.log):"
  grep -E '^(FAILED|ERROR)' "$work/pytest.log" | head -30
fi
echo "check_latest: the environment stays in $work (remove it when done)"
exit "$status"
