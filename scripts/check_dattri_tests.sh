#!/usr/bin/env bash
# Run dattri 0.3.0's own attributor and task tests against dattri_cli (the drop-in check).
#
# Downloads dattri's source distribution, takes its tests of the classes in our API
# reference, rewrites only the import paths of the API under test
# (dattri.algorithm -> dattri_cli.algorithm, dattri.task -> dattri_cli.task,
# dattri.func.utils -> dattri_cli.func.utils) and runs them with pytest. dattri itself
# is installed into a separate virtual environment (never a dependency of ours): its
# tests train their small models with dattri.benchmark helpers.
#
# Usage: scripts/check_dattri_tests.sh [WORKDIR] [-- PYTEST_ARGS...]
#   WORKDIR defaults to .dattri-tests (git-ignored). Needs network access to PyPI once.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$repo/.dattri-tests}"
shift $(( $# > 0 ? 1 : 0 )) || true
[[ "${1:-}" == "--" ]] && shift
mkdir -p "$work"
work="$(cd "$work" && pwd)"
venv="$work/venv"
if [[ ! -x "$venv/bin/python" ]]; then
    python -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install -q torch==2.13.0
    "$venv/bin/pip" install -q dattri==0.3.0
    "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$repo"
fi
if [[ ! -d "$work/dattri-0.3.0" ]]; then
    "$venv/bin/pip" download -q --no-binary :all: --no-deps dattri==0.3.0 -d "$work"
    tar -xzf "$work/dattri-0.3.0.tar.gz" -C "$work"
fi
tests="$work/rewritten"
rm -rf "$tests" && mkdir -p "$tests"
src="$work/dattri-0.3.0/test/dattri"
for f in algorithm/test_influence_function.py algorithm/test_tracin.py algorithm/test_trak.py \
         algorithm/test_rps.py test_task.py; do
    sed -e 's/\bdattri\.algorithm\b/dattri_cli.algorithm/g' \
        -e 's/\bdattri\.task\b/dattri_cli.task/g' \
        -e 's/\bdattri\.func\.utils\b/dattri_cli.func.utils/g' \
        "$src/$f" > "$tests/$(basename "$f")"
done
# The tests our reference does not cover, or that need what no test of ours should:
#  - test_ekfac_transform_test_rep / test_datainf_transform_test_rep: dattri's private
#    attributes (_cached_train_reps, _get_layer_wise_reps) and EK-FAC internals;
#  - test_cifar2_multi_ckpts_grad: trains a CIFAR-2 ResNet-9 (minutes of CPU, a download).
deselect=(
    --deselect "test_influence_function.py::TestInfluenceFunction::test_datainf_transform_test_rep"
    --deselect "test_influence_function.py::TestInfluenceFunction::test_ekfac_transform_test_rep"
    --deselect "test_tracin.py::TestTracInAttributor::test_cifar2_multi_ckpts_grad"
)
cd "$tests"
# the installed dattri_cli must be this checkout's (the venv's editable install)
"$venv/bin/python" -c "import dattri_cli, sys; sys.exit(0 if dattri_cli.__file__.startswith('$repo') else 'dattri_cli is not $repo')"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "${deselect[@]}" "$@" .
