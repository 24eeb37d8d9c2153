"""Score files, ground truths and .pt files are data: reading them never runs code they name."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from dattri_cli import cli
from dattri_cli.groundtruth import KIND, groundtruth_key
from dattri_cli.io import save_scores, write_tensor_file

N_TRAIN, N_TEST = 6, 3


def hostile_config(marker: Path) -> dict:
    """A recorded config whose dataset and model would create ``marker`` if instantiated."""
    touch = {"_target_": "pathlib.Path.touch", "_args_": [str(marker)]}
    return {
        "dataset": dict(touch),
        "model": dict(touch),
        "train": {"epochs": 1},
        "attributor": dict(touch),
    }


def write_hostile_scores(path: Path, marker: Path, shard=None, rows=range(N_TRAIN)) -> Path:
    rows = list(rows)
    meta = {
        "config": hostile_config(marker),
        "config_hash": "f" * 64,
        "attributor": {"target": "pathlib.Path.touch"},
    }
    if shard is not None:
        meta["shard"] = shard
    scores = torch.arange(len(rows) * N_TEST, dtype=torch.float32).reshape(len(rows), N_TEST)
    save_scores(path, scores, torch.tensor(rows), torch.arange(100, 100 + N_TEST), meta)
    return path


@pytest.fixture
def hostile(tmp_path):
    marker = tmp_path / "pwned"
    return write_hostile_scores(tmp_path / "evil.safetensors", marker), marker


def _run(args):
    try:
        cli.main(args)
    except SystemExit as exc:
        return exc.code
    return 0


def test_show_does_not_instantiate_recorded_targets(hostile, capsys):
    path, marker = hostile
    assert _run(["show", str(path), "--test", "1"]) == 0
    captured = capsys.readouterr()
    assert not marker.exists()
    assert "labels not available for this dataset" in captured.err
    assert "label " not in captured.out and "proponent" in captured.out


def test_show_json_does_not_instantiate(hostile, capsys):
    path, marker = hostile
    assert _run(["show", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert not marker.exists()
    assert "label" not in data["tests"][0]


def test_show_shards_do_not_instantiate(tmp_path, capsys):
    marker = tmp_path / "pwned"
    for index, rows in enumerate((range(0, 3), range(3, 6))):
        shard = {"index": index, "count": 2, "rows": [rows.start, rows.stop], "n_train": N_TRAIN}
        write_hostile_scores(tmp_path / f"scores-{index:05d}-of-00002.safetensors", marker, shard, rows)
    assert _run(["show", str(tmp_path)]) == 0
    assert _run(["show", str(tmp_path / "scores-00001-of-00002.safetensors")]) == 0
    assert not marker.exists()
    assert "labels not available" in capsys.readouterr().err


def test_merge_does_not_instantiate(tmp_path):
    marker = tmp_path / "pwned"
    for index, rows in enumerate((range(0, 3), range(3, 6))):
        shard = {"index": index, "count": 2, "rows": [rows.start, rows.stop], "n_train": N_TRAIN}
        write_hostile_scores(tmp_path / f"scores-{index:05d}-of-00002.safetensors", marker, shard, rows)
    assert _run(["merge", str(tmp_path), f"out={tmp_path / 'merged.safetensors'}"]) == 0
    assert _run(["show", str(tmp_path / "merged.safetensors")]) == 0
    assert not marker.exists()


def test_plot_does_not_instantiate(hostile, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, marker = hostile
    assert _run(["plot", str(path), "--out", str(tmp_path / "p.png")]) == 0
    assert not marker.exists()
    assert (tmp_path / "p.png").is_file()
    assert "labels not available" in capsys.readouterr().err


def test_compare_does_not_instantiate(hostile, capsys):
    path, marker = hostile
    assert _run(["compare", str(path), str(path), "--exact"]) == 0
    assert not marker.exists()


def test_eval_does_not_instantiate(hostile, tmp_path, capsys):
    path, marker = hostile
    config = hostile_config(marker)
    tensors = {
        "subsets": torch.tensor([[0, 1, 2], [3, 4, 5], [0, 2, 4]]),
        "targets": torch.rand(3, N_TEST, generator=torch.Generator().manual_seed(0)),
        "train_indices": torch.arange(N_TRAIN),
        "test_indices": torch.arange(100, 100 + N_TEST),
    }
    gt = tmp_path / "gt.safetensors"
    write_tensor_file(
        gt, tensors, {"kind": KIND, "config": config, "groundtruth_key": groundtruth_key(config)}
    )
    assert _run(["eval", f"scores={path}", f"groundtruth={gt}", "--json", "bootstrap=10"]) == 0
    assert not marker.exists()
    assert json.loads(capsys.readouterr().out)["lds"] is not None


def test_unknown_recorded_dataset_keys_are_not_passed_on(tmp_path, capsys):
    """A built-in target with an argument it does not take is not rebuilt either."""
    meta = {
        "config": {
            "dataset": {
                "_target_": "dattri_cli.data.digits",
                "_recursive_": True,
                "n_train": {"_target_": "os.getcwd"},
            }
        }
    }
    path = tmp_path / "s.safetensors"
    save_scores(path, torch.zeros(4, 2), torch.arange(4), torch.arange(2), meta)
    assert _run(["show", str(path), "--json"]) == 0
    out = capsys.readouterr()
    assert "labels not available" in out.err and "label" not in json.loads(out.out)["tests"][0]


def test_builtin_recorded_dataset_gives_labels(small_run, capsys):
    from dattri_cli import pipeline

    path = pipeline.run(small_run()).path
    assert _run(["show", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "label" in data["tests"][0] and "label" in data["tests"][0]["proponents"][0]


class Payload:
    """Unpickling this calls ``Path.touch(marker)``: what a hostile .pt file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _hostile_pt(tmp_path: Path, content) -> Path:
    path = tmp_path / "evil.pt"
    torch.save(content, path)
    return path


def test_pickled_checkpoint_is_refused_without_running(tmp_path, capsys, cache_dir):
    marker = tmp_path / "pwned"
    path = _hostile_pt(tmp_path, {"linear.weight": Payload(marker)})
    assert not marker.exists()
    code = _run(
        [
            "run",
            "progress=off",
            f"checkpoint={path}",
            f"out={tmp_path / 's.safetensors'}",
            f"cache_dir={cache_dir}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    assert "pickled Python objects" in err and "safetensors" in err
    assert "weights_only=False" not in err.replace(
        "weights_only=False), 'f.safetensors'", ""
    )  # only in the opt-in recipe
    assert "Traceback" not in err


def test_pickled_data_file_is_refused_without_running(tmp_path, capsys, cache_dir):
    marker = tmp_path / "pwned"
    path = _hostile_pt(tmp_path, {"x": torch.zeros(10, 2), "y": Payload(marker)})
    code = _run(
        [
            "run",
            "progress=off",
            "dataset=file",
            f"dataset.path={path}",
            f"out={tmp_path / 's.safetensors'}",
            f"cache_dir={cache_dir}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    assert "pickled Python objects" in err and "Traceback" not in err


def test_payload_really_runs_when_unpickled(tmp_path):
    """The fixture is live: an unsafe load would create the marker."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()
