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
    save_file({"linear.weight": torch.zeros(3, 3), "linear.bias": torch.zeros(3)}, str(tmp / "wrong.safetensors"))


def _corrupt_checkpoint(tmp: Path) -> None:
    (tmp / "corrupt.pt").write_bytes(b"not a torch file at all")


def _existing_output(tmp: Path) -> None:
    (tmp / "exists.safetensors").write_bytes(b"keep me")


def _bad_score_file(tmp: Path) -> None:
    (tmp / "bad.safetensors").write_bytes(b"\x00garbage")


def _foreign_safetensors(tmp: Path) -> None:
    save_file({"weights": torch.zeros(2)}, str(tmp / "foreign.safetensors"))


CATALOGUE: List[BadInput] = [
    BadInput("unknown attributor", ["run", "attributor=nope"], "unknown attributor 'nope'; choose one of", "pick a name from `dattri list`"),
    BadInput("unknown dataset", ["run", "dataset=imagenet"], "unknown dataset 'imagenet'", "pick a name from `dattri list`, or dataset=file for your own data"),
    BadInput("unknown model", ["run", "model=resnet"], "unknown model 'resnet'", "pick a name from `dattri list`, or model=custom with model._target_"),
    BadInput("mistyped option", ["run", "attributor.regularisation=0.1"], "Could not override 'attributor.regularisation'", "check the spelling with `dattri run --cfg job`"),
    BadInput("unknown keyword argument", ["run", *FAST, "+attributor.bogus=1"], "unknown option(s) attributor.bogus", "use only the keyword arguments the message lists as accepted"),
    BadInput("wrong value type", ["run", *FAST, "train.epochs=abc"], "train.epochs must be an integer", "give a value of the stated type"),
    BadInput("n_train larger than the dataset", ["run", *FAST, "dataset.n_train=5000"], "fewer than n_train + n_test", "lower dataset.n_train / dataset.n_test"),
    BadInput("n_test of zero", ["run", *FAST, "dataset.n_test=0"], "dataset.n_test must be an integer >= 1", "ask for at least one train and one test sample"),
    BadInput("missing checkpoint file", ["run", *FAST, "checkpoint={tmp}/none.safetensors"], "checkpoint file not found", "fix the path, or leave `checkpoint` unset to train one"),
    BadInput("checkpoint that does not fit the model", ["run", *FAST, "checkpoint={tmp}/wrong.safetensors"], "checkpoint does not fit the model", "choose the model the checkpoint was saved from", _wrong_checkpoint),
    BadInput("unreadable checkpoint", ["run", *FAST, "checkpoint={tmp}/corrupt.pt"], "could not read checkpoint", "save the state dict with safetensors or torch.save", _corrupt_checkpoint),
    BadInput("missing data file", ["run", *FAST, "dataset=file", "dataset.path={tmp}/none.npz"], "data file not found", "fix dataset.path"),
    BadInput("data file without y", ["run", *FAST, "dataset=file", "dataset.path={tmp}/noy.npz"], "lacks ['y']", "store inputs as `x` and integer labels as `y`", _npz_without_y),
    BadInput("CSV without the label column", ["run", *FAST, "dataset=file", "dataset.path={tmp}/d.csv"], "no label column 'label'", "set dataset.label_column to the label's column name", _csv_without_label),
    BadInput("NaN in the data", ["run", *FAST, "dataset=file", "dataset.path={tmp}/nan.npz"], "contains NaN or Inf", "clean the data file", _nan_data),
    BadInput("empty dataset", ["run", *FAST, "dataset=file", "dataset.path={tmp}/empty.npz"], "is empty", "give a file with samples", _empty_data),
    BadInput("singular Hessian without regularization", ["run", *FAST, "attributor=if_explicit", "train.weight_decay=0"], "singular", "set attributor.regularization to a positive value"),
    BadInput("singular TRAK kernel", ["run", *FAST, "attributor=trak"], "singular", "lower attributor.projector_kwargs.proj_dim below the number of training samples"),
    BadInput("LiSSA divergence", ["run", *FAST, "attributor=if_lissa", "attributor.scaling=0.001", "attributor.recursion_depth=200"], "scaling", "raise attributor.scaling or attributor.damping"),
    BadInput("GPU asked for on a machine without one", ["run", *FAST, "device=cuda"], "sees no CUDA GPU", "use device=cpu, or a CUDA build of torch on a GPU machine"),
    BadInput("bad progress mode", ["run", *FAST, "progress=loud"], "progress must be one of", "use off, log, rich or auto"),
    BadInput("row count per score file of zero", ["run", *FAST, "output.rows_per_file=0"], "output.rows_per_file must be auto or a positive", "give auto or a positive number of training rows per file"),
    BadInput("unwritable output path", ["run", *FAST, "out=/proc/dattri/scores.safetensors"], "cannot write", "choose a writable out=PATH"),
    BadInput("existing output without overwrite", ["run", *FAST, "overwrite=false", "out={tmp}/exists.safetensors"], "already exists", "pass overwrite=true or another out=PATH", _existing_output),
    BadInput("malformed score file given to show", ["show", "{tmp}/bad.safetensors"], "not a readable safetensors score file", "give a file written by `dattri run`", _bad_score_file),
    BadInput("safetensors file that is not a score file", ["show", "{tmp}/foreign.safetensors"], "is not a dattri-cli score file", "give a file written by `dattri run`", _foreign_safetensors),
    BadInput("missing score file given to plot", ["plot", "{tmp}/none.safetensors"], "score file not found", "check the path"),
    BadInput("unknown command", ["frobnicate"], "unknown command 'frobnicate'", "see `dattri --help`"),
]
