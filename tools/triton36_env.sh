#!/usr/bin/env bash
# Builds the Triton 3.6 environment (what the GPU machines run) and compiles every Triton kernel of kernels/
# there for sm_90 and sm_80 (tests/integration/test_triton_compile.py). Triton 3.6 cannot sit beside the newest Triton in
# one environment, so it lives in its own small virtual environment on top of the environment that runs this
# script (torch and the test tools come from there through a .pth file, which sys.path lists after the venv's
# own site packages, so the venv's triton==3.6.0 shadows the outer one). Exit status: the
# tests' (non-zero on a compile error, shared memory over a target's limit, or a spill in a 16-bit kernel).
#
#   bash tools/triton36_env.sh            # venv at $FASTPRERL_TRITON36_VENV (default: <repo>/.venv-triton36)
#   bash tools/triton36_env.sh --fresh    # delete and rebuild it first
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
VENV="${FASTPRERL_TRITON36_VENV:-$REPO/.venv-triton36}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY="$VENV/bin/python"
WANT="3.6.0"

if [[ "${1:-}" == "--fresh" ]]; then
    rm -rf "$VENV"
fi

outer=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [[ -x "$PY" ]] && [[ "$("$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null)" == "$WANT" ]] \
        && [[ "$(cat "$VENV"/lib/python*/site-packages/outer-environment.pth 2>/dev/null)" == "$outer" ]]; then
    echo "triton36_env: reusing $VENV"
else
    start=$SECONDS
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    inner=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$outer" > "$inner/outer-environment.pth"
    # one retry: a registry hiccup must not decide the outcome
    "$PY" -m pip install -q "triton==$WANT" || "$PY" -m pip install -q "triton==$WANT"
    echo "triton36_env: built $VENV in $((SECONDS - start)) s"
fi
# the kernels of THIS checkout (the outer environment may hold an editable install of another one)
"$PY" -m pip install -q --no-deps -e "$REPO"
"$PY" -c "import triton, torch; print('triton36_env: triton', triton.__version__, '| torch', torch.__version__)"
got=$("$PY" -c 'import triton; print(triton.__version__)')
if [[ "$got" != "$WANT" ]]; then
    echo "triton36_env: FAILED: the venv imports triton $got, not $WANT" >&2
    exit 1
fi

start=$SECONDS
status=0
FASTPRERL_EXPECT_TRITON="$WANT" "$PY" -m pytest -q -p no:cacheprovider -rs tests/integration/test_triton_compile.py || status=$?
echo "triton36_env: tests/integration/test_triton_compile.py took $((SECONDS - start)) s (exit $status)"
if [[ $status -eq 5 ]]; then
    echo "triton36_env: pytest collected no test" >&2
fi
exit $status
