#!/usr/bin/env bash
# Virtual environments of the peers that scripts/bench_big.py compares with (never dependencies
# of dattri-cli). Idempotent: a venv that already imports its library is left alone.
#
#   bash scripts/peers/setup_peers.sh            # all three
#   PEERS_DIR=/somewhere bash scripts/peers/setup_peers.sh traker
#
# Each venv is created with --system-site-packages so that it uses the torch already installed
# (pip is never allowed to bring its own torch: the libraries are installed with --no-deps and
# their small pure-Python dependencies are named explicitly). torchvision is never installed
# (on a CPU torch it breaks `import transformers`); Kronfluence lists it but does not need it
# for the models benchmarked here.
#   dattri 0.3.0         -> $DATTRI_VENV (default /tmp/dattri-venv, as scripts/bench_attributors.py)
#   traker 0.3.2         -> $PEERS_DIR/traker-venv        (CPU BasicProjector; no fast_jl)
#   kronfluence 1.0.1    -> $PEERS_DIR/kronfluence-venv
# PEERS_DIR defaults to /work/peers (bench_big.py reads DATTRI_PEERS_DIR / DATTRI_PYTHON the same way).
set -euo pipefail

PEERS_DIR="${PEERS_DIR:-${DATTRI_PEERS_DIR:-/work/peers}}"
DATTRI_VENV="${DATTRI_VENV:-/tmp/dattri-venv}"
PYTHON="${PYTHON:-python3}"
WANTED=("$@")
[ ${#WANTED[@]} -eq 0 ] && WANTED=(dattri traker kronfluence)

status=0

# make_venv DIR PROBE PACKAGES... : create DIR if needed, install PACKAGES with --no-deps
make_venv() {
    local dir="$1" probe="$2"
    shift 2
    if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "$probe" >/dev/null 2>&1; then
        echo "ok (already there): $dir"
        return 0
    fi
    echo "creating $dir"
    [ -x "$dir/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$dir"
    local torch_before
    torch_before="$("$dir/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)"
    "$dir/bin/pip" install -q --no-deps "$@"
    local torch_after
    torch_after="$("$dir/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)"
    if [ "$torch_before" != "$torch_after" ]; then
        echo "ERROR: installing into $dir changed torch ($torch_before -> $torch_after)" >&2
        return 1
    fi
    if "$dir/bin/python" -c "$probe"; then
        echo "ok: $dir"
    else
        echo "FAILED: $dir cannot '$probe'" >&2
        return 1
    fi
}

for peer in "${WANTED[@]}"; do
    case "$peer" in
        dattri)
            make_venv "$DATTRI_VENV" "import dattri, tqdm" dattri==0.3.0 tqdm || status=1 ;;
        traker)
            # traker's own requirements beyond torch/numpy/tqdm are satisfied by the system site
            make_venv "$PEERS_DIR/traker-venv" "import trak; from trak.projectors import BasicProjector" \
                traker==0.3.2 || status=1 ;;
        kronfluence)
            # needs accelerate, einops, einconv, opt_einsum, psutil (+ safetensors, scikit-learn,
            # transformers, tqdm, which the system site has)
            make_venv "$PEERS_DIR/kronfluence-venv" \
                "import kronfluence, accelerate, einops, opt_einsum; from kronfluence.analyzer import Analyzer" \
                kronfluence==1.0.1 accelerate==1.15.0 einops==0.8.2 einconv==0.1.0 opt_einsum==3.4.0 psutil==7.2.2 \
                || status=1 ;;
        *)
            echo "unknown peer $peer (dattri, traker, kronfluence)" >&2
            status=1 ;;
    esac
done
exit $status
