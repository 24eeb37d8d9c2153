"""Ground truth by retraining: identical whatever the parallelism, resumable, self-describing."""

from __future__ import annotations

import pytest
import torch

from dattri_cli import groundtruth as gt
from dattri_cli.errors import DattriError
from tests.conftest import compose_run

TINY = ["dataset.n_train=40", "dataset.n_test=6", "train.epochs=2", "progress=off", "dataset.label_noise=0.1"]


def _settings(tmp_path, name, **kw):
    base = {"num_subsets": 3, "alpha": 0.5, "seeds_per_subset": 1, "loo": [1], "out": str(tmp_path / name)}
    return gt.GroundTruthSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One worker, one go: the file every other schedule must reproduce byte for byte."""
    tmp = tmp_path_factory.mktemp("gt-ref")
    return gt.generate(compose_run(TINY), _settings(tmp, "ref.safetensors")).read_bytes()


def test_file_contents_and_metadata(tmp_path):
    out = gt.generate(compose_run(TINY), _settings(tmp_path, "g.safetensors", num_subsets=2, loo=[]))
    tensors, meta = gt.load_groundtruth(out)
    assert tensors["subsets"].shape == (2, 20) and tensors["subsets"].dtype == torch.int64
    assert tensors["targets"].shape == (2, 6) and tensors["targets"].dtype == torch.float32
    assert (tensors["targets"] > 0).all()  # cross-entropies
    assert int(tensors["flipped"].sum()) == 4 and meta["label_noise"]["flipped"] == 4
    assert "loo_targets" not in tensors
    assert meta["groundtruth_key"] == gt.groundtruth_key(gt.builders.to_dict(compose_run(TINY)))
    # an ensemble size or attributor change keeps the key; a data change does not
    assert meta["groundtruth_key"] == gt.groundtruth_key(
        gt.builders.to_dict(compose_run([*TINY, "train.num_models=3", "attributor=if_explicit"]))
    )
    assert meta["groundtruth_key"] != gt.groundtruth_key(
        gt.builders.to_dict(compose_run([*TINY, "dataset.n_test=7"]))
    )
    assert "workers" not in meta["settings"]


def test_two_workers_give_identical_bytes(tmp_path, reference):
    out = gt.generate(compose_run(TINY), _settings(tmp_path, "two.safetensors", workers=2))
    assert out.read_bytes() == reference


def test_killed_job_resumes_to_identical_bytes(tmp_path, reference):
    cfg = compose_run(TINY)
    settings = _settings(tmp_path, "resumed.safetensors", max_jobs=2)
    assert gt.generate(cfg, settings) is None  # stopped early, like a killed job
    parts = tmp_path / "resumed.safetensors.parts"
    assert len(list(parts.glob("*.safetensors"))) == 2
    assert not (tmp_path / "resumed.safetensors").exists()
    (parts / ".subset00002_r00.safetensors.x.tmp").write_bytes(b"half-written")  # a kill mid-write
    settings.max_jobs = None
    out = gt.generate(cfg, settings)
    assert out.read_bytes() == reference


def test_work_dir_of_other_settings_is_refused(tmp_path):
    cfg = compose_run(TINY)
    gt.generate(
        cfg, _settings(tmp_path, "a.safetensors", num_subsets=1, loo=[], work_dir=str(tmp_path / "w"))
    )
    with pytest.raises(DattriError, match="different config"):
        gt.generate(
            cfg,
            _settings(
                tmp_path, "b.safetensors", num_subsets=1, loo=[], alpha=0.3, work_dir=str(tmp_path / "w")
            ),
        )


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(DattriError, match="alpha"):
        gt.generate(compose_run(TINY), _settings(tmp_path, "x.safetensors", alpha=1.5))
    with pytest.raises(DattriError, match="loo positions"):
        gt.generate(compose_run(TINY), _settings(tmp_path, "x.safetensors", loo=[40]))


def test_command_line_mixes_settings_and_overrides(tmp_path, capsys):
    from dattri_cli.cli import main

    out = tmp_path / "cli.safetensors"
    main(["groundtruth", *TINY, "num_subsets=1", "loo=[0,2]", "alpha=0.25", f"out={out}"])
    assert "written" in capsys.readouterr().out
    tensors, meta = gt.load_groundtruth(out)
    assert tensors["subsets"].shape == (1, 10) and tensors["loo_indices"].tolist() == [0, 2]
    assert meta["config"]["dataset"]["n_train"] == 40
    with pytest.raises(SystemExit) as exit_info:
        main(["groundtruth", *TINY, "alpha=2", f"out={out}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: alpha")
