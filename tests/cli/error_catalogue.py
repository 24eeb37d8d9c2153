"""The catalogue of bad inputs: each must give one actionable line, exit non-zero,
no traceback and no output file. `test_errors.py` walks it; `scripts/gen_troubleshooting.py`
turns it into docs/troubleshooting.md.

Arguments may use ``{tmp}`` (a scratch directory prepared by ``setup``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
from safetensors.torch import save_file

FAST = ["dataset.n_train=40", "dataset.n_test=8", "train.epochs=2", "progress=off"]


@dataclass
class BadInput:
    name: str
    args: List[str]
    expect: str  # a fragment of the one-line message
    fix: str  # what the user should do (for the troubleshooting page)
    setup: Optional[Callable[[Path], None]] = field(default=None, repr=False)


def _npz_without_y(tmp: Path) -> None:
    np.savez(tmp / "noy.npz", x=np.zeros((10, 2), np.float32))


def _csv_without_label(tmp: Path) -> None:
    (tmp / "d.csv").write_text("a,b\n1,2\n3,4\n")


def _nan_data(tmp: Path) -> None:
    x = np.ones((30, 2), np.float32)
    x[2, 0] = np.nan
    np.savez(tmp / "nan.npz", x=x, y=np.zeros(30, np.int64))


def _empty_data(tmp: Path) -> None:
    np.savez(tmp / "empty.npz", x=np.zeros((0, 2), np.float32), y=np.zeros(0, np.int64))


def _wrong_checkpoint(tmp: Path) -> None:
    save_file(
        {"linear.weight": torch.zeros(3, 3), "linear.bias": torch.zeros(3)}, str(tmp / "wrong.safetensors")
    )


def _corrupt_checkpoint(tmp: Path) -> None:
    (tmp / "corrupt.pt").write_bytes(b"not a torch file at all")


def _existing_output(tmp: Path) -> None:
    (tmp / "exists.safetensors").write_bytes(b"keep me")


def _bad_score_file(tmp: Path) -> None:
    (tmp / "bad.safetensors").write_bytes(b"\x00garbage")


def _foreign_safetensors(tmp: Path) -> None:
    save_file({"weights": torch.zeros(2)}, str(tmp / "foreign.safetensors"))


def _npz(tmp: Path, name: str, x, y) -> None:
    np.savez(tmp / name, x=np.asarray(x), y=np.asarray(y))


def _two_class_y(n: int) -> np.ndarray:
    return np.arange(n) % 2


def _onehot_labels(tmp: Path) -> None:
    _npz(tmp, "d.npz", np.ones((30, 2), np.float32), np.eye(2)[_two_class_y(30)])


def _fractional_labels(tmp: Path) -> None:
    y = _two_class_y(30).astype(np.float32)
    y[4] = 2.7
    _npz(tmp, "d.npz", np.ones((30, 2), np.float32), y)


def _negative_labels(tmp: Path) -> None:
    y = _two_class_y(30)
    y[7] = -1
    _npz(tmp, "d.npz", np.ones((30, 2), np.float32), y)


def _nan_labels(tmp: Path) -> None:
    y = _two_class_y(30).astype(np.float64)
    y[3] = np.nan
    _npz(tmp, "d.npz", np.ones((30, 2), np.float32), y)


def _inf_inputs(tmp: Path) -> None:
    x = np.ones((30, 2), np.float32)
    x[5, 1] = np.inf
    _npz(tmp, "d.npz", x, _two_class_y(30))


def _one_class(tmp: Path) -> None:
    _npz(
        tmp, "d.npz", np.random.default_rng(0).normal(size=(60, 2)).astype(np.float32), np.zeros(60, np.int64)
    )


def _flat_inputs(tmp: Path) -> None:
    _npz(tmp, "d.npz", np.ones(30, np.float32), _two_class_y(30))


def _test_file_other_features(tmp: Path) -> None:
    _npz(tmp, "tr.npz", np.ones((40, 3), np.float32), _two_class_y(40))
    _npz(tmp, "te.npz", np.ones((8, 4), np.float32), _two_class_y(8))


def _test_file_unseen_class(tmp: Path) -> None:
    _npz(tmp, "tr.npz", np.ones((40, 3), np.float32), _two_class_y(40))
    _npz(tmp, "te.npz", np.ones((8, 3), np.float32), np.full(8, 5))


def _ragged_csv(tmp: Path) -> None:
    (tmp / "r.csv").write_text("a,b,label\n1,2,0\n3,4\n5,6,1\n")


def _non_numeric_csv(tmp: Path) -> None:
    (tmp / "n.csv").write_text("a,b,label\n1,2,0\n3,4,1\n5,abc,1\n")


def _empty_npz_file(tmp: Path) -> None:
    (tmp / "e.npz").write_bytes(b"")


def _truncated_npz(tmp: Path) -> None:
    _npz(tmp, "full.npz", np.ones((200, 8), np.float32), _two_class_y(200))
    data = (tmp / "full.npz").read_bytes()
    (tmp / "t.npz").write_bytes(data[: len(data) // 2])


def _empty_safetensors_data(tmp: Path) -> None:
    (tmp / "e.safetensors").write_bytes(b"")


def _truncated_safetensors_data(tmp: Path) -> None:
    save_file({"x": torch.ones(200, 8), "y": torch.arange(200) % 2}, str(tmp / "full.safetensors"))
    data = (tmp / "full.safetensors").read_bytes()
    (tmp / "t.safetensors").write_bytes(data[: len(data) // 2])
    (tmp / "full.safetensors").unlink()


def _truncated_checkpoint(tmp: Path) -> None:
    save_file(
        {"linear.weight": torch.zeros(10, 64), "linear.bias": torch.zeros(10)}, str(tmp / "full.safetensors")
    )
    data = (tmp / "full.safetensors").read_bytes()
    (tmp / "ckpt.safetensors").write_bytes(data[: len(data) - 100])
    (tmp / "full.safetensors").unlink()


class _Payload:
    """Unpickling runs ``Path.touch``: stands for a .pt file that carries code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _pickled_checkpoint(tmp: Path) -> None:
    torch.save({"linear.weight": _Payload(tmp / "pwned"), "linear.bias": torch.zeros(10)}, tmp / "code.pt")


def _pickled_data(tmp: Path) -> None:
    torch.save({"x": torch.ones(30, 2), "y": _Payload(tmp / "pwned")}, tmp / "code.pt")


FILE = [*FAST, "dataset=file"]

CATALOGUE: List[BadInput] = [
    BadInput(
        "unknown attributor",
        ["run", "attributor=nope"],
        "unknown attributor 'nope'; choose one of",
        "pick a name from `dattri list`",
    ),
    BadInput(
        "unknown dataset",
        ["run", "dataset=imagenet"],
        "unknown dataset 'imagenet'",
        "pick a name from `dattri list`, or dataset=file for your own data",
    ),
    BadInput(
        "unknown model",
        ["run", "model=resnet"],
        "unknown model 'resnet'",
        "pick a name from `dattri list`, or model=custom with model._target_",
    ),
    BadInput(
        "mistyped option",
        ["run", "attributor.regularisation=0.1"],
        "Could not override 'attributor.regularisation'",
        "check the spelling with `dattri run --cfg job`",
    ),
    BadInput(
        "unknown keyword argument",
        ["run", *FAST, "+attributor.bogus=1"],
        "unknown option(s) attributor.bogus",
        "use only the keyword arguments the message lists as accepted",
    ),
    BadInput(
        "wrong value type",
        ["run", *FAST, "train.epochs=abc"],
        "train.epochs must be an integer",
        "give a value of the stated type",
    ),
    BadInput(
        "n_train larger than the dataset",
        ["run", *FAST, "dataset.n_train=5000"],
        "fewer than n_train + n_test",
        "lower dataset.n_train / dataset.n_test",
    ),
    BadInput(
        "n_test of zero",
        ["run", *FAST, "dataset.n_test=0"],
        "dataset.n_test must be an integer >= 1",
        "ask for at least one train and one test sample",
    ),
    BadInput(
        "missing checkpoint file",
        ["run", *FAST, "checkpoint={tmp}/none.safetensors"],
        "checkpoint file not found",
        "fix the path, or leave `checkpoint` unset to train one",
    ),
    BadInput(
        "checkpoint that does not fit the model",
        ["run", *FAST, "checkpoint={tmp}/wrong.safetensors"],
        "checkpoint does not fit the model",
        "choose the model the checkpoint was saved from",
        _wrong_checkpoint,
    ),
    BadInput(
        "unreadable checkpoint",
        ["run", *FAST, "checkpoint={tmp}/corrupt.pt"],
        "could not read checkpoint",
        "save the state dict with safetensors or torch.save",
        _corrupt_checkpoint,
    ),
    BadInput(
        "missing data file",
        ["run", *FAST, "dataset=file", "dataset.path={tmp}/none.npz"],
        "data file not found",
        "fix dataset.path",
    ),
    BadInput(
        "data file without y",
        ["run", *FAST, "dataset=file", "dataset.path={tmp}/noy.npz"],
        "lacks ['y']",
        "store inputs as `x` and integer labels as `y`",
        _npz_without_y,
    ),
    BadInput(
        "CSV without the label column",
        ["run", *FAST, "dataset=file", "dataset.path={tmp}/d.csv"],
        "no label column 'label'",
        "set dataset.label_column to the label's column name",
        _csv_without_label,
    ),
    BadInput(
        "NaN in the data",
        ["run", *FAST, "dataset=file", "dataset.path={tmp}/nan.npz"],
        "contains NaN or Inf",
        "clean the data file",
        _nan_data,
    ),
    BadInput(
        "empty dataset",
        ["run", *FAST, "dataset=file", "dataset.path={tmp}/empty.npz"],
        "is empty",
        "give a file with samples",
        _empty_data,
    ),
    BadInput(
        "singular Hessian without regularization",
        ["run", *FAST, "attributor=if_explicit", "train.weight_decay=0"],
        "singular",
        "set attributor.regularization to a positive value",
    ),
    BadInput(
        "LiSSA divergence",
        ["run", *FAST, "attributor=if_lissa", "attributor.scaling=0.001", "attributor.recursion_depth=200"],
        "scaling",
        "raise attributor.scaling or attributor.damping",
    ),
    BadInput(
        "GPU asked for on a machine without one",
        ["run", *FAST, "device=cuda"],
        "sees no CUDA GPU",
        "use device=cpu, or a CUDA build of torch on a GPU machine",
    ),
    BadInput(
        "bad progress mode",
        ["run", *FAST, "progress=loud"],
        "progress must be one of",
        "use off, log, rich or auto",
    ),
    BadInput(
        "row count per score file of zero",
        ["run", *FAST, "output.rows_per_file=0"],
        "output.rows_per_file must be auto or a positive",
        "give auto or a positive number of training rows per file",
    ),
    BadInput(
        "unwritable output path",
        ["run", *FAST, "out=/proc/dattri/scores.safetensors"],
        "cannot write",
        "choose a writable out=PATH",
    ),
    BadInput(
        "existing output without overwrite",
        ["run", *FAST, "overwrite=false", "out={tmp}/exists.safetensors"],
        "already exists",
        "pass overwrite=true or another out=PATH",
        _existing_output,
    ),
    BadInput(
        "malformed score file given to show",
        ["show", "{tmp}/bad.safetensors"],
        "not a readable safetensors score file",
        "give a file written by `dattri run`",
        _bad_score_file,
    ),
    BadInput(
        "safetensors file that is not a score file",
        ["show", "{tmp}/foreign.safetensors"],
        "is not a dattri-cli score file",
        "give a file written by `dattri run`",
        _foreign_safetensors,
    ),
    BadInput(
        "missing score file given to plot",
        ["plot", "{tmp}/none.safetensors"],
        "score file not found",
        "check the path",
    ),
    BadInput(
        "labels that are not 1-D",
        ["run", *FILE, "dataset.path={tmp}/d.npz"],
        "labels must be 1-D",
        "store one class index per sample (y.argmax(1) for one-hot labels)",
        _onehot_labels,
    ),
    BadInput(
        "non-integer labels",
        ["run", *FILE, "dataset.path={tmp}/d.npz"],
        "labels must be whole class numbers, but y[4] = 2.7",
        "store class indices 0..K-1, not scores",
        _fractional_labels,
    ),
    BadInput(
        "negative labels",
        ["run", *FILE, "dataset.path={tmp}/d.npz"],
        "y[7] = -1",
        "map your classes to 0..K-1",
        _negative_labels,
    ),
    BadInput(
        "labels beyond the model's class count",
        ["run", *FAST, "model.num_classes=5"],
        "but model.num_classes=5",
        "raise model.num_classes or leave it unset",
    ),
    BadInput(
        "NaN labels",
        ["run", *FILE, "dataset.path={tmp}/d.npz"],
        "NaN or Inf labels (first at row 3)",
        "give every sample a class",
        _nan_labels,
    ),
    BadInput(
        "Inf in the inputs",
        ["run", *FILE, "dataset.path={tmp}/d.npz"],
        "contains NaN or Inf inputs (first at row 5)",
        "clean the data file",
        _inf_inputs,
    ),
    BadInput(
        "only one class",
        ["run", *FILE, "dataset.path={tmp}/d.npz"],
        "only one class",
        "check dataset.label_column, or use more training rows",
        _one_class,
    ),
    BadInput(
        "inputs without a feature dimension",
        ["run", *FILE, "dataset.path={tmp}/d.npz"],
        "it must be (samples, features...)",
        "reshape 1-D data to (N, 1)",
        _flat_inputs,
    ),
    BadInput(
        "test file with other features",
        [
            "run",
            *FILE,
            "dataset.path={tmp}/tr.npz",
            "dataset.test_path={tmp}/te.npz",
            "dataset.n_train=null",
            "dataset.n_test=null",
        ],
        "need the same features",
        "give train and test files the same columns",
        _test_file_other_features,
    ),
    BadInput(
        "test labels the training set never has",
        [
            "run",
            *FILE,
            "dataset.path={tmp}/tr.npz",
            "dataset.test_path={tmp}/te.npz",
            "dataset.n_train=null",
            "dataset.n_test=null",
        ],
        "cannot predict a class it never saw",
        "use test samples of classes present in training",
        _test_file_unseen_class,
    ),
    BadInput(
        "ragged CSV",
        ["run", *FILE, "dataset.path={tmp}/r.csv"],
        "line 3 has 2 fields but the header has 3",
        "give every row one value per column",
        _ragged_csv,
    ),
    BadInput(
        "non-numeric CSV value",
        ["run", *FILE, "dataset.path={tmp}/n.csv"],
        "line 4 holds a non-numeric value",
        "make every column numeric",
        _non_numeric_csv,
    ),
    BadInput(
        "empty .npz file",
        ["run", *FILE, "dataset.path={tmp}/e.npz"],
        "cannot read data file",
        "write the data file again",
        _empty_npz_file,
    ),
    BadInput(
        "truncated .npz file",
        ["run", *FILE, "dataset.path={tmp}/t.npz"],
        "cannot read data file",
        "write the data file again",
        _truncated_npz,
    ),
    BadInput(
        "empty .safetensors data file",
        ["run", *FILE, "dataset.path={tmp}/e.safetensors"],
        "cannot read data file",
        "write the data file again",
        _empty_safetensors_data,
    ),
    BadInput(
        "truncated .safetensors data file",
        ["run", *FILE, "dataset.path={tmp}/t.safetensors"],
        "cannot read data file",
        "write the data file again",
        _truncated_safetensors_data,
    ),
    BadInput(
        "truncated safetensors checkpoint",
        ["run", *FAST, "checkpoint={tmp}/ckpt.safetensors"],
        "could not read checkpoint",
        "save the checkpoint again",
        _truncated_checkpoint,
    ),
    BadInput(
        "checkpoint holding pickled code",
        ["run", *FAST, "checkpoint={tmp}/code.pt"],
        "holds pickled Python objects",
        "convert it to safetensors, only if you trust its source",
        _pickled_checkpoint,
    ),
    BadInput(
        "data file holding pickled code",
        ["run", *FILE, "dataset.path={tmp}/code.pt"],
        "holds pickled Python objects",
        "convert it to safetensors, only if you trust its source",
        _pickled_data,
    ),
    BadInput("unknown command", ["frobnicate"], "unknown command 'frobnicate'", "see `dattri --help`"),
    # every configuration value is checked against dattri_cli/schema.py before any work (issue 14, section 2)
    BadInput(
        "boolean that is not a boolean word",
        ["run", *FAST, "overwrite=n", "out={tmp}/exists.safetensors"],
        "overwrite must be a boolean (true/false, yes/no, on/off, 1/0), got 'n'",
        "write true/false, yes/no, on/off or 1/0",
        _existing_output,
    ),
    BadInput(
        "overwrite=no keeps an existing file",
        ["run", *FAST, "overwrite=no", "out={tmp}/exists.safetensors"],
        "already exists",
        "overwrite=no means false: pass overwrite=true or another out=PATH",
        _existing_output,
    ),
    BadInput(
        "feature_cache that is not a boolean",
        ["run", *FAST, "feature_cache=maybe"],
        "feature_cache must be a boolean",
        "write feature_cache=true or feature_cache=false",
    ),
    BadInput(
        "solver iterations of zero",
        ["run", *FAST, "attributor=if_cg", "attributor.max_iter=0"],
        "attributor.max_iter must be an integer >= 1, got 0",
        "give at least one iteration",
    ),
    BadInput(
        "solver iterations that are not a number",
        ["run", *FAST, "attributor=if_cg", "attributor.max_iter=abc"],
        "attributor.max_iter must be an integer >= 1, got 'abc'",
        "give a whole number of iterations",
    ),
    BadInput(
        "shard count of zero",
        ["run", *FAST, "shard.count=0"],
        "shard.count must be an integer >= 1, got 0",
        "give shard.count >= 1",
    ),
    BadInput(
        "shard index outside the count",
        ["run", *FAST, "shard.index=2", "shard.count=2"],
        "shard.index must be one of 0..1",
        "number shards from 0 to shard.count - 1",
    ),
    BadInput(
        "hidden layer of width zero",
        ["run", *FAST, "model=mlp", "model.hidden=[0]"],
        "model.hidden must be a list with each item an integer >= 1, got [0]",
        "give positive layer widths, e.g. model.hidden=[64]",
    ),
    BadInput(
        "misspelled runner key",
        ["run", *FAST, "+attributor.runner.self_influnce=true"],
        "did you mean attributor.runner.self_influence?",
        "use a key the message lists as accepted",
    ),
    BadInput(
        "runner value outside its choices",
        ["run", *FAST, "attributor.runner.checkpoints=all"],
        "attributor.runner.checkpoints must be one of final, trajectory, got 'all'",
        "use final or trajectory",
    ),
    BadInput(
        "unknown training setting",
        ["run", *FAST, "+train.bogus=1"],
        "unknown option(s) train.bogus",
        "use only the training settings the message lists",
    ),
    BadInput(
        "batch size of zero",
        ["run", *FAST, "loader.train_batch_size=0"],
        "loader.train_batch_size must be an integer >= 1, got 0",
        "give a positive batch size",
    ),
    BadInput(
        "negative batch size",
        ["run", *FAST, "loader.train_batch_size=-1"],
        "loader.train_batch_size must be an integer >= 1, got -1",
        "give a positive batch size",
    ),
    BadInput(
        "batch size that is not a number",
        ["run", *FAST, "loader.test_batch_size=abc"],
        "loader.test_batch_size must be an integer >= 1, got 'abc'",
        "give a positive batch size",
    ),
    BadInput(
        "seed that is not a number",
        ["run", *FAST, "seed=abc"],
        "seed must be an integer >= 0, got 'abc'",
        "give a whole number >= 0",
    ),
    BadInput(
        "sample count that is not a number",
        ["run", *FAST, "dataset.n_train=abc"],
        "dataset.n_train must be an integer >= 1 or null, got 'abc'",
        "give a whole number of samples",
    ),
    BadInput(
        "fractional sample count",
        ["run", *FAST, "dataset.n_train=150.5"],
        "dataset.n_train must be an integer >= 1 or null, got 150.5",
        "give a whole number of samples",
    ),
    BadInput(
        "label noise outside [0, 1)",
        ["run", *FAST, "dataset.label_noise=1.5"],
        "dataset.label_noise must be a finite number in [0, 1)",
        "give the fraction of labels to flip, below 1",
    ),
    BadInput(
        "learning rate NaN",
        ["run", *FAST, "train.lr=nan"],
        "train.lr must be a finite number in [0, 100], got nan",
        "give a finite learning rate such as 0.1",
    ),
    BadInput(
        "learning rate out of range",
        ["run", *FAST, "train.lr=1e30"],
        "train.lr must be a finite number in [0, 100], got 1e+30",
        "give a learning rate such as 0.1",
    ),
    BadInput(
        "momentum above one",
        ["run", *FAST, "train.momentum=2"],
        "train.momentum must be a finite number in [0, 1], got 2",
        "give a momentum in [0, 1]",
    ),
    BadInput(
        "attributor choice outside its options",
        ["run", *FAST, "attributor=if_ekfac", "attributor.fisher=exact"],
        "attributor.fisher must be one of gauss_newton, empirical, got 'exact'",
        "use gauss_newton or empirical",
    ),
    BadInput(
        "EK-FAC output samples not a positive integer",
        ["run", *FAST, "attributor=if_ekfac", "attributor.num_output_samples=0"],
        "num_output_samples must be null (exact) or a positive integer, got 0",
        "leave it null (one backward pass per model output) or give a number of sampled pseudo-gradients",
    ),
    BadInput(
        "run that cannot fit in memory (memory guard)",
        ["run", *FAST, "attributor=if_explicit", "model=mlp", "model.hidden=[4096]"],
        "IFAttributorExplicit on 307,210 parameters needs about",
        "use the override the message names (here attributor=if_cg), or memory_guard=false to run anyway",
    ),
    BadInput(
        "attributor flag that is not a boolean",
        ["run", *FAST, "attributor.normalized_grad=maybe"],
        "attributor.normalized_grad must be a boolean",
        "write true or false",
    ),
    BadInput(
        "projection dimension of zero",
        ["run", *FAST, "attributor=trak", "attributor.projector_kwargs.proj_dim=0"],
        "attributor.projector_kwargs.proj_dim must be a positive integer",
        "give a positive proj_dim",
    ),
    BadInput(
        "custom model without a class",
        ["run", *FAST, "model=custom"],
        "model._target_ must name the class or function to build",
        "set model._target_=package.module.Class",
    ),
    BadInput(
        "data file not named",
        ["run", *FAST, "dataset=file"],
        "dataset.path needs a value",
        "set dataset.path=PATH",
    ),
    BadInput(
        "unwritable cache_dir",
        ["run", *FAST, "cache_dir=/proc/dattri-cache"],
        "cache_dir=/proc/dattri-cache is not writable",
        "set cache_dir (or DATTRI_CACHE_DIR) to a writable directory",
    ),
    BadInput(
        "misspelled config group",
        ["run", "atributor=trak"],
        "did you mean attributor?",
        "use the key the message suggests",
    ),
    BadInput(
        "misspelled config group added with +",
        ["run", "+atributor=trak"],
        "unknown key 'atributor'",
        "top-level keys cannot be added; use the key the message suggests",
    ),
    BadInput(
        "unknown top-level key added with +",
        ["run", *FAST, "+verbose=true"],
        "unknown key 'verbose'",
        "see `dattri run --cfg job` for the keys",
    ),
    BadInput(
        "misspelled attributor option",
        ["run", "attributor=if_cg", "attributor.regularisation=0.1"],
        "did you mean attributor.regularization?",
        "use the key the message suggests",
    ),
    BadInput(
        "misspelled option name",
        ["run", "dataset=digit"],
        "unknown dataset 'digit' (did you mean digits?)",
        "pick a name from `dattri list`",
    ),
    BadInput(
        "ground truth alpha that is not a number",
        ["groundtruth", *FAST, "alpha=abc"],
        "alpha must be a finite number in (0, 1), got 'abc'",
        "give a fraction such as alpha=0.5",
    ),
    BadInput(
        "ground truth alpha of one",
        ["groundtruth", *FAST, "alpha=1"],
        "alpha must be a finite number in (0, 1), got 1",
        "give a fraction below 1",
    ),
    BadInput(
        "ground truth loo positions that are not numbers",
        ["groundtruth", *FAST, "loo=[a]"],
        "loo must be a list with each item an integer >= 0, got ['a']",
        "give row positions, e.g. loo=[0,5,9]",
    ),
    BadInput(
        "ground truth subset count that is not a number",
        ["groundtruth", *FAST, "num_subsets=abc"],
        "num_subsets must be an integer >= 0, got 'abc'",
        "give a whole number of subsets",
    ),
    BadInput(
        "ground truth workers of zero",
        ["groundtruth", *FAST, "workers=0"],
        "workers must be an integer >= 1, got 0",
        "give at least one worker",
    ),
    BadInput(
        "ground truth with a bad run value",
        ["groundtruth", *FAST, "dataset.n_train=abc"],
        "dataset.n_train must be an integer >= 1 or null, got 'abc'",
        "give a whole number of samples",
    ),
    BadInput(
        "ground truth with a misspelled group",
        ["groundtruth", *FAST, "modle=mlp"],
        "did you mean model?",
        "use the key the message suggests",
    ),
    BadInput(
        "eval bootstrap that is not a number",
        ["eval", "scores={tmp}/s.safetensors", "groundtruth={tmp}/g.safetensors", "bootstrap=abc"],
        "bootstrap must be an integer >= 1, got 'abc'",
        "give a whole number of bootstrap resamples",
    ),
    BadInput(
        "eval level outside (0, 1)",
        ["eval", "scores={tmp}/s.safetensors", "groundtruth={tmp}/g.safetensors", "level=5"],
        "level must be a finite number in (0, 1), got 5",
        "give a confidence level such as 0.95",
    ),
    BadInput(
        "eval seed that is not a number",
        ["eval", "scores={tmp}/s.safetensors", "groundtruth={tmp}/g.safetensors", "seed=x"],
        "seed must be an integer >= 0, got 'x'",
        "give a whole number >= 0",
    ),
    BadInput(
        "eval argument misspelled",
        ["eval", "scores={tmp}/s.safetensors", "groundtruth={tmp}/g.safetensors", "boostrap=10"],
        "did you mean bootstrap?",
        "use the argument the message suggests",
    ),
]
