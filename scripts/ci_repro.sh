#!/usr/bin/env bash
# Reproducibility check for CI: the same config twice must give bitwise-identical
# scores, and a different loader batch size must agree within tolerance (batching
# changes only the order of floating-point sums).
#
#   scripts/ci_repro.sh [OVERRIDES...]        e.g. scripts/ci_repro.sh attributor=if_explicit
#
# Environment: DATTRI (command, default `dattri`; e.g. "python -m dattri_cli"),
# OUT_DIR (default: a fresh temporary directory), SCALE_ATOL / RTOL / MIN_SPEARMAN.
set -euo pipefail

DATTRI=${DATTRI:-dattri}
OUT_DIR=${OUT_DIR:-$(mktemp -d)}
SCALE_ATOL=${SCALE_ATOL:-1e-5}   # of the largest |score|: float32 sums in another order differ ~1e-6
RTOL=${RTOL:-1e-4}
MIN_SPEARMAN=${MIN_SPEARMAN:-0.999}
mkdir -p "$OUT_DIR"

run() { $DATTRI run progress=log "$@"; }

echo "== run A and B: same config"
run "$@" out="$OUT_DIR/a.safetensors"
run "$@" out="$OUT_DIR/b.safetensors"
$DATTRI compare "$OUT_DIR/a.safetensors" "$OUT_DIR/b.safetensors" --exact

echo "== run C: train loader batch size 7"
run "$@" loader.train_batch_size=7 loader.test_batch_size=3 out="$OUT_DIR/c.safetensors"
$DATTRI compare "$OUT_DIR/a.safetensors" "$OUT_DIR/c.safetensors" \
    --scale-atol "$SCALE_ATOL" --rtol "$RTOL" --min-spearman "$MIN_SPEARMAN"

echo "reproducible: scores in $OUT_DIR"
