#!/usr/bin/env bash
# Everything nmfx can check on one NVIDIA GPU (H100/H200), in at most 8 minutes, written to one
# directory as JSON + text: the environment, the GPU tests, benchmarks/gpu_linear.py,
# benchmarks/gpu_e2e.py, TensorRT if torch_tensorrt imports, and summary.{json,txt}.
#
#   bash scripts/gpu_check.sh [OUTDIR]            on the GPU machine (OUTDIR defaults to $OUT)
#   bash scripts/gpu_check.sh --dry-run [OUTDIR]  anywhere: the CPU-checkable parts; exit 0
#   bash scripts/gpu_check.sh --wheels DIR ...    install missing pure-python deps from DIR
#   bash scripts/gpu_check.sh --fetch-wheels DIR  (with network) download those wheels to DIR
#
# nmfx is used from this checkout (PYTHONPATH) and also installed with
# `pip install --no-deps --no-build-isolation -e .`, so the machine's own torch is never
# replaced (the script checks torch's version before and after). A GPU machine without network
# cannot install missing dependencies unless --wheels points at a wheelhouse; the script then
# says what is missing and skips only what needs it (the raw kernel timings need torch alone).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

DRY=0
WHEELS="${NMFX_WHEELS:-}"
OUTDIR="${OUT:-}"
BUDGET_S="${NMFX_GPU_CHECK_BUDGET_S:-460}"
PURE_DEPS=(networkx tabulate safetensors tqdm ninja pytest hypothesis setuptools)
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --wheels) WHEELS="${2:?--wheels needs a directory}"; shift ;;
        --fetch-wheels)
            dest="${2:?--fetch-wheels needs a directory}"
            exec "${PYTHON:-python3}" -m pip download --only-binary=:all: --python-version 3.12 \
                --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
                --platform any -d "$dest" "${PURE_DEPS[@]}" ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) OUTDIR="$1" ;;
    esac
    shift
done
if [ -z "$OUTDIR" ]; then
    if [ "$DRY" = 1 ]; then OUTDIR="$(mktemp -d)"; else
        echo "gpu_check: no output directory: pass one or set OUT (see --help)" >&2; exit 2
    fi
fi
if ! mkdir -p "$OUTDIR" || ! touch "$OUTDIR/.probe"; then
    echo "gpu_check: cannot write to $OUTDIR; pick a writable directory" >&2; exit 2
fi
rm -f "$OUTDIR/.probe"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"  # $PYTHON picks the interpreter
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/nmfx-gpu-check/torch_ext}"
export NMFX_CACHE_DIR="${NMFX_CACHE_DIR:-/tmp/nmfx-gpu-check/cache}"
# nmfx's C++ CPU kernels are not what this checks; building them would eat the budget.
export NMFX_DISABLE_KERNELS="${NMFX_DISABLE_KERNELS:-1}"
START=$(date +%s)
STEPS="$OUTDIR/steps.tsv"
: > "$STEPS"

# record NAME STATUS RC SECONDS REASON
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$STEPS"; }
skip() { record "$1" skipped "" 0 "$2"; echo "== $1: SKIPPED ($2)"; }

# step NAME LIMIT_S CMD...: run with a time limit (capped by what is left of the budget),
# output to NAME.log; a step that cannot get 10 s is skipped.
step() {
    local name="$1" limit="$2"; shift 2
    local left=$(( BUDGET_S - ($(date +%s) - START) ))
    [ "$left" -lt "$limit" ] && limit="$left"
    if [ "$limit" -lt 10 ]; then skip "$name" "time budget of ${BUDGET_S}s spent"; return 0; fi
    echo "== $name (limit ${limit}s)"
    local t0; t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
    local rc=$? status=ok reason=""
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; reason="killed after ${limit}s"
    elif [ "$rc" != 0 ]; then status=failed; reason="exit $rc; see $name.log"; fi
    record "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$reason"
    tail -n 25 "$OUTDIR/$name.log"
    echo "== $name: $status"
}

# ---- 1. environment and dependencies -------------------------------------------------------
"$PY" - "$OUTDIR/env.json" "${PURE_DEPS[@]}" transformers torch_tensorrt <<'EOF'
import importlib, json, platform, shutil, subprocess, sys
out, *names = sys.argv[1:]
env = {"python": platform.python_version(), "executable": sys.executable, "deps": {}}
for name in ["torch", *names]:
    try:
        mod = importlib.import_module(name)
        env["deps"][name] = getattr(mod, "__version__", "present")
    except Exception as exc:  # report any import failure as missing, with its reason
        env["deps"][name] = None
        env.setdefault("import_errors", {})[name] = f"{type(exc).__name__}: {exc}"[:300]
try:
    import torch
    env.update(torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        env.update(device=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability(),
                   cusparselt=torch.backends.cusparselt.version())
except Exception as exc:
    env["torch_error"] = repr(exc)
if shutil.which("nvidia-smi"):
    q = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    env["nvidia_smi"] = subprocess.run(q, capture_output=True, text=True).stdout.strip()
json.dump(env, open(out, "w"), indent=1)
missing = [n for n, v in env["deps"].items() if v is None]
print(f"python {env['python']}, torch {env['deps']['torch']}, CUDA available: "
      f"{env.get('cuda_available')}, {env.get('device', 'no GPU')}; missing: {missing or 'none'}")
EOF
MISSING=$("$PY" -c "import json,sys; d=json.load(open(sys.argv[1]))['deps']; print(' '.join(n for n in sys.argv[2:] if d.get(n) is None))" "$OUTDIR/env.json" "${PURE_DEPS[@]}")
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$DRY" = 0 ] && [ "$HAS_CUDA" != 1 ]; then
    echo "gpu_check: no CUDA device here; run with --dry-run for the CPU-checkable parts" >&2
    exit 2
fi

# ---- 2. install nmfx without touching torch --------------------------------------------------
if [ "$DRY" = 1 ]; then
    skip install "dry run: would install missing [${MISSING:-none}] and pip install --no-deps --no-build-isolation -e ."
else
    nmfx_install() {
        local before after
        before=$("$PY" -c "import torch; print(torch.__version__)")
        if [ -n "$MISSING" ]; then
            if [ -n "$WHEELS" ]; then
                "$PY" -m pip install --no-index --find-links "$WHEELS" $MISSING
            else
                "$PY" -m pip install --retries 0 --timeout 5 $MISSING \
                    || echo "could not install [$MISSING] (no network? use --wheels DIR)"
            fi
        fi
        "$PY" -m pip install --no-deps --no-build-isolation -e . \
            || echo "editable install failed; nmfx is used from PYTHONPATH=$ROOT"
        after=$("$PY" -c "import torch; print(torch.__version__)")
        echo "torch before: $before, after: $after"
        [ "$before" = "$after" ] || { echo "ERROR: the install changed torch"; return 1; }
    }
    export -f nmfx_install
    export PY MISSING WHEELS ROOT
    step install 60 bash -c nmfx_install
fi
# import_error MODULE: empty if it imports (warnings on stderr do not count), else the last line.
import_error() {
    local out
    if out=$("$PY" -c "import $1" 2>&1); then echo ""; else echo "${out##*$'\n'}"; fi
}
NMFX_IMPORT=$(import_error nmfx)
[ -n "$NMFX_IMPORT" ] && echo "nmfx does not import: $NMFX_IMPORT"

# ---- 3. tests -----------------------------------------------------------------------------------
TESTS=(tests/gpu tests/unit/test_lower_cuda.py tests/unit/test_lower_tensorrt.py
       tests/unit/passes/test_detect_and_lower_passes.py)
if [ "$DRY" = 1 ]; then
    skip pytest "dry run: no GPU (the CPU tier of ${TESTS[*]} runs in CI)"
elif ! "$PY" -c "import pytest" 2>/dev/null; then
    skip pytest "pytest is not installed and could not be (use --wheels DIR)"
elif [ -n "$NMFX_IMPORT" ]; then
    skip pytest "nmfx does not import: $NMFX_IMPORT"
else
    # tests/conftest.py imports hypothesis; without it the GPU tests still run, unseeded.
    NOCONF=(); "$PY" -c "import hypothesis" 2>/dev/null || NOCONF=(--noconftest)
    step pytest 120 "$PY" -m pytest -q -rs -p no:cacheprovider "${NOCONF[@]}" \
        --junitxml="$OUTDIR/pytest.xml" "${TESTS[@]}"
fi

# ---- 4. benchmarks ------------------------------------------------------------------------------
DRYFLAG=(); [ "$DRY" = 1 ] && DRYFLAG=(--dry-run)
step gpu_linear 140 "$PY" benchmarks/gpu_linear.py --out "$OUTDIR" --budget-s 100 "${DRYFLAG[@]}"
if [ -n "$NMFX_IMPORT" ]; then
    skip gpu_e2e "nmfx does not import: $NMFX_IMPORT"
else
    step gpu_e2e 150 "$PY" benchmarks/gpu_e2e.py --out "$OUTDIR" --budget-s 90 "${DRYFLAG[@]}"
fi

# ---- 5. TensorRT ----------------------------------------------------------------------------------
TRT=$(import_error torch_tensorrt)
if [ -n "$TRT" ]; then
    skip tensorrt "torch_tensorrt does not import ($TRT)"
elif [ "$DRY" = 1 ]; then
    skip tensorrt "dry run: no GPU"
else
    record tensorrt ok 0 0 "tests/gpu/test_lower_tensorrt_gpu.py ran in the pytest step"
fi

# ---- 6. summary -------------------------------------------------------------------------------------
"$PY" scripts/gpu_check_summary.py "$OUTDIR" --dry-run "$DRY" --seconds "$(( $(date +%s) - START ))"
