"""`dattri eval` and `dattri compare` end to end on tiny problems."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dattri_cli import evaluate, pipeline
from dattri_cli import groundtruth as gt
from dattri_cli.cli import main
from dattri_cli.errors import DattriError
from dattri_cli.io import load_scores, save_scores
from tests.conftest import compose_run

SHARED = [
    "dataset.n_train=40",
    "dataset.n_test=8",
    "train.epochs=8",
    "dataset.label_noise=0.15",
    "progress=off",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, cache_dir):
    """A ground truth (LDS + LOO + flips) and an IF score file of the same config."""
    tmp = tmp_path_factory.mktemp("eval")
    settings = gt.GroundTruthSettings(
        num_subsets=10, alpha=0.5, loo=[0, 5, 10, 15], out=str(tmp / "gt.safetensors")
    )
    gt_path = gt.generate(compose_run(SHARED), settings)
    run = compose_run(
        [*SHARED, "attributor=if_explicit", f"cache_dir={cache_dir}", f"out={tmp / 'if.safetensors'}"]
    )
    return tmp, pipeline.run(run).path, gt_path


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_eval_reports_every_metric(files, capsys):
    tmp, scores, truth = files
    code, out, _ = run_cli(
        ["eval", f"scores={scores}", f"groundtruth={truth}", "--json", f"out={tmp / 'r.json'}"], capsys
    )
    assert code == 0
    report = json.loads(out)
    assert report == json.loads((tmp / "r.json").read_text())
    lds = report["lds"]
    assert lds["n_subsets"] == 10 and lds["ci_low"] <= lds["mean"] <= lds["ci_high"]
    assert lds["mean"] > 0.2  # IF on a convex model predicts retraining; a sign slip gives < 0
    assert -1 <= report["loo"]["mean_pearson"] <= 1 and report["loo"]["n_removed"] == 4
    assert report["mislabel_auc"]["n_flipped"] == 6
    assert report["mislabel_auc"]["by_harm"] > 0.5
    code, out, _ = run_cli(["eval", f"scores={scores}", f"groundtruth={truth}"], capsys)
    assert code == 0 and "LDS" in out and "mislabel AUC" in out


def test_negated_scores_flip_the_lds(files, tmp_path):
    _, scores, truth = files
    tensors, meta = load_scores(scores)
    flipped = tmp_path / "neg.safetensors"
    save_scores(flipped, -tensors["scores"], tensors["train_indices"], tensors["test_indices"], meta)
    good = evaluate.evaluate(scores, truth, bootstrap=50)["lds"]["mean"]
    bad = evaluate.evaluate(flipped, truth, bootstrap=50)["lds"]["mean"]
    assert bad == pytest.approx(-good)


@pytest.mark.parametrize(
    ("override", "expected"),
    [("dataset.n_test=9", "test indices differ"), ("train.epochs=7", "train config differs")],
)
def test_eval_refuses_files_that_do_not_belong_together(
    files, tmp_path, cache_dir, capsys, override, expected
):
    _, _, truth = files
    other = pipeline.run(
        compose_run([*SHARED, override, f"cache_dir={cache_dir}", f"out={tmp_path / 'o.safetensors'}"])
    ).path
    with pytest.raises(DattriError, match=expected):
        evaluate.evaluate(other, truth)
    code, _, err = run_cli(["eval", f"scores={other}", f"groundtruth={truth}"], capsys)
    assert code == 2 and err.startswith("error:") and "Traceback" not in err


def test_compare_copy_passes_perturbed_copy_fails(files, tmp_path, capsys):
    _, scores, _ = files
    copy = tmp_path / "copy.safetensors"
    shutil.copy(scores, copy)
    code, out, _ = run_cli(
        ["compare", str(scores), str(copy), "--exact", "--min-spearman", "0.999", "--json"], capsys
    )
    stats = json.loads(out)
    assert (
        code == 0 and stats["identical"] and stats["metadata_differs"] == [] and stats["top_k_overlap"] == 1.0
    )

    tensors, meta = load_scores(scores)
    noise = torch.randn(tensors["scores"].shape, generator=torch.Generator().manual_seed(0))
    perturbed = tmp_path / "perturbed.safetensors"
    save_scores(
        perturbed,
        tensors["scores"] * (1 + 1e-3 * noise),
        tensors["train_indices"],
        tensors["test_indices"],
        {**meta, "seed": 99},
    )
    assert run_cli(["compare", str(scores), str(perturbed), "--exact"], capsys)[0] == 1
    code, out, _ = run_cli(["compare", str(scores), str(perturbed), "--rtol", "1e-2", "--json"], capsys)
    assert code == 0 and json.loads(out)["metadata_differs"] == ["seed"]
    assert run_cli(["compare", str(scores), str(perturbed), "--rtol", "1e-5"], capsys)[0] == 1
    shuffled = tmp_path / "shuffled.safetensors"
    save_scores(
        shuffled,
        tensors["scores"][torch.randperm(40)],
        tensors["train_indices"],
        tensors["test_indices"],
        meta,
    )
    code, out, _ = run_cli(["compare", str(scores), str(shuffled), "--min-spearman", "0.9"], capsys)
    assert code == 1 and "FAIL" in out


def test_compare_refuses_different_samples(files, tmp_path, capsys):
    _, scores, _ = files
    tensors, meta = load_scores(scores)
    other = tmp_path / "other.safetensors"
    save_scores(other, tensors["scores"], tensors["train_indices"] + 1, tensors["test_indices"], meta)
    code, _, err = run_cli(["compare", str(scores), str(other)], capsys)
    assert code == 2 and "different samples" in err


@pytest.mark.parametrize("attributor", ["grad_dot", "if_explicit", "trak"])
def test_saved_self_influence_gives_a_second_mislabel_auc(files, tmp_path, cache_dir, attributor):
    _, _, truth = files
    cfg = compose_run(
        [
            *SHARED,
            f"attributor={attributor}",
            "+attributor.runner.self_influence=true",
            f"cache_dir={cache_dir}",
            f"out={tmp_path / 's.safetensors'}",
        ]
    )
    path = pipeline.run(cfg).path
    tensors, _ = load_scores(path)
    assert tensors["self_influence"].shape == (40,)
    auc = evaluate.evaluate(path, truth, bootstrap=10)["mislabel_auc"]
    assert 0.0 <= auc["by_self_influence"] <= 1.0
