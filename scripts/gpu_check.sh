#!/usr/bin/env bash
# The CUDA path of every attributor, checked against the CPU (issue 17). Run it on a machine with
# a GPU, from the repository root, with whatever CUDA build of torch is installed there:
#
#   bash scripts/gpu_check.sh                 # everything (a few minutes on one GPU)
#   bash scripts/gpu_check.sh --dry-run       # print the commands only (no GPU needed)
#   bash scripts/gpu_check.sh --skip-bench    # the tiny built-in jobs only
#
# 1. `dattri run attributor=X` on the tiny built-in job (digits, logistic regression, 60 x 12)
#    with device=cpu and device=cuda, the same trained checkpoint (training is cached under
#    $WORK/cache and does not depend on the device), then `dattri compare` of the two score
#    files with a tolerance per attributor; prints wall time and peak GPU memory
#    (torch.cuda.max_memory_allocated) of each CUDA run.
# 2. scripts/bench_big.py's ResNet-18 case (ours only): every method at a small size on cpu and
#    on cuda, scores compared; then the full size (N_TRAIN x N_TEST, default 1000 x 100) on cuda,
#    the table with time, ratio to the floor, peak RSS and peak GPU memory.
#
# Exits non-zero when CUDA is not available, or when any CUDA run fails or disagrees with the CPU.
# Environment: PYTHON (default python), WORK (default a new temp dir), N_TRAIN, N_TEST, BATCH,
# ATTRIBUTORS (space-separated subset), TIMEOUT (seconds per bench_big call, default 600),
# DEVICE (default cuda; DEVICE=cpu runs everything on the CPU against itself, to test this script).
set -uo pipefail

DRY=0
SKIP_BENCH=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --skip-bench) SKIP_BENCH=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument $arg (--dry-run, --skip-bench)" >&2; exit 2 ;;
    esac
done

PY="${PYTHON:-python}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEVICE="${DEVICE:-cuda}"
if [ "$DRY" = 1 ]; then
    WORK="${WORK:-/tmp/gpu_check.DRY-RUN}"
else
    WORK="${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
fi
N_TRAIN="${N_TRAIN:-1000}"
N_TEST="${N_TEST:-100}"
BATCH="${BATCH:-64}"
TIMEOUT="${TIMEOUT:-600}"
ATTRIBUTORS="${ATTRIBUTORS:-grad_dot grad_cos tracin trak if_explicit if_cg if_lissa if_arnoldi if_datainf if_ekfac if_kfac rps}"
SMALL=(dataset.n_train=60 dataset.n_test=12 train.epochs=3 loader.train_batch_size=16
       loader.test_batch_size=5 progress=off feature_cache=false "cache_dir=$WORK/cache")
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# tolerance of `dattri compare` per attributor: float32 on two devices; iterative and random
# methods (random minibatches, random projections, Krylov iterations) agree in ranking only
tolerance() {
    case "$1" in
        if_lissa|if_arnoldi|trak) echo "--min-spearman 0.95" ;;
        if_cg) echo "--scale-atol 1e-2 --min-spearman 0.99" ;;
        *) echo "--scale-atol 1e-3 --min-spearman 0.999" ;;
    esac
}

say() { echo "+ $*"; }
run() {
    say "$@"
    [ "$DRY" = 1 ] && return 0
    "$@"
}

echo "gpu_check $(date -u '+%Y-%m-%d %H:%M UTC'), work dir $WORK"
[ "$DRY" = 1 ] || mkdir -p "$WORK"

# 0. CUDA must be there
if [ "$DEVICE" = cpu ]; then
    echo "DEVICE=cpu: testing this script, not the GPU"
elif [ "$DRY" = 1 ]; then
    say "$PY -c 'import torch; assert torch.cuda.is_available()'"
else
    if ! "$PY" - <<'EOF'
import sys

import torch

print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    print("CUDA is NOT available to this python: gpu_check needs a CUDA build of torch and a visible GPU",
          file=sys.stderr)
    sys.exit(1)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB")
EOF
    then
        exit 3
    fi
fi

failures=()

# one `dattri run` in-process, printing wall time and peak GPU memory as the last line
timed_run() {
    local device="$1" attributor="$2" out="$3"
    say "dattri run attributor=$attributor device=$device ${SMALL[*]} out=$out"
    [ "$DRY" = 1 ] && return 0
    "$PY" - "$device" "$attributor" "$out" "${SMALL[@]}" <<'EOF'
import json, sys, time

import torch

from dattri_cli.cli import main

device, attributor, out, *small = sys.argv[1:]
if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
code = 0
try:
    main(["run", f"attributor={attributor}", f"device={device}", *small, f"out={out}"])
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
if device.startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0
print(json.dumps({"attributor": attributor, "device": device, "seconds": round(seconds, 3),
                  "gpu_peak_mib": round(peak, 1), "exit": code}))
sys.exit(code)
EOF
}

# timed_run with its output in a log: the result line is shown, and the log's tail on failure
logged_run() {
    local log="$WORK/$2-$1.log"
    if [ "$DRY" = 1 ]; then
        timed_run "$@"
        return 0
    fi
    timed_run "$@" >"$log" 2>&1
    local rc=$?
    tail -n 1 "$log"
    if [ $rc -ne 0 ]; then
        echo "  failed (exit $rc); last lines of $log:"
        tail -n 8 "$log" | sed 's/^/    /'
    fi
    return $rc
}

# 1. every attributor on the tiny built-in job, cpu vs cuda
echo "== 1. attributors on the tiny built-in job: cpu vs cuda"
for a in $ATTRIBUTORS; do
    cpu="$WORK/$a-cpu.safetensors"
    gpu="$WORK/$a-$DEVICE-second.safetensors"
    if ! logged_run cpu "$a" "$cpu"; then failures+=("$a: cpu run failed"); continue; fi
    if ! logged_run "$DEVICE" "$a" "$gpu"; then failures+=("$a: $DEVICE run failed"); continue; fi
    # shellcheck disable=SC2046
    if ! run "$PY" -m dattri_cli compare "$cpu" "$gpu" $(tolerance "$a"); then
        failures+=("$a: cuda scores differ from cpu beyond $(tolerance "$a")")
    fi
done

# 2. the ResNet-18 case of bench_big: small cpu vs cuda agreement, then the full size on cuda
if [ "$SKIP_BENCH" = 0 ]; then
    echo "== 2. ResNet-18 (bench_big, ours): cpu vs cuda at 64 x 16, then ${N_TRAIN} x ${N_TEST} on cuda"
    for dev in cpu "$DEVICE"; do
        run "$PY" "$ROOT/scripts/bench_big.py" --models resnet18 --peers none --device "$dev" \
            --n-train 64 --n-test 16 --batch 16 --timeout "$TIMEOUT" --work-dir "$WORK/resnet_small_$dev" \
            --json "$WORK/resnet_small_$dev.json" || failures+=("bench_big small $dev failed")
    done
    if [ "$DRY" = 1 ]; then
        say "$PY (compare $WORK/resnet_small_cpu/resnet18/*_ours.safetensors with the cuda ones)"
    else
        "$PY" - "$WORK" "$DEVICE" <<'EOF' || failures+=("bench_big: $DEVICE scores differ from cpu")
import sys
from pathlib import Path

from safetensors.torch import load_file

from dattri_cli.compare import compare_scores

work, device = Path(sys.argv[1]), sys.argv[2]
bad = 0
for cpu in sorted((work / "resnet_small_cpu" / "resnet18").glob("*_ours.safetensors")):
    gpu = work / f"resnet_small_{device}" / "resnet18" / cpu.name
    if not gpu.is_file():
        print(f"{cpu.stem}: no cuda scores")
        bad += 1
        continue
    a, b = load_file(str(cpu))["scores"], load_file(str(gpu))["scores"]
    s = compare_scores(a, b)
    random = "trak" in cpu.stem  # projections may be drawn differently per device
    ok = s["spearman"] >= (0.95 if random else 0.999)
    bad += not ok
    print(f"{cpu.stem}: pearson {s['pearson']:.6f} spearman {s['spearman']:.6f} "
          f"max rel diff {s['max_rel_diff']:.2e} {'ok' if ok else 'DIFFERS'}")
sys.exit(1 if bad else 0)
EOF
    fi
    run "$PY" "$ROOT/scripts/bench_big.py" --models resnet18 --peers none --device "$DEVICE" \
        --n-train "$N_TRAIN" --n-test "$N_TEST" --batch "$BATCH" --timeout "$TIMEOUT" \
        --work-dir "$WORK/resnet_full" --json "$WORK/resnet_full.json" --markdown "$WORK/gpu_check.md" \
        || failures+=("bench_big full size on cuda failed")
fi

echo "== summary"
if [ ${#failures[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failures[@]}"
    exit 1
fi
echo "all CUDA checks passed (work dir $WORK)"
