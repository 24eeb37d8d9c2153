"""Checkpoint loading: Lightning, DDP and torch.compile prefixes, Hugging Face directories, refusals."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from dattri_cli.algorithm.tracin import TracInAttributor
from dattri_cli.errors import CheckpointError
from dattri_cli.models import MLP
from dattri_cli.models.train import make_loss_funcs
from dattri_cli.task import AttributionTask, default_checkpoint_load_func, find_prefix, load_state_dict_file


def _model() -> MLP:
    torch.manual_seed(0)
    return MLP(4, 3, hidden=[5])


def _state() -> Dict[str, Tensor]:
    torch.manual_seed(1)
    return {k: torch.randn_like(v) for k, v in _model().state_dict().items()}


def _scores(checkpoint, load_func=None) -> Tensor:
    model = _model()
    loss, target = make_loss_funcs(model, 0.0, 1)
    task = AttributionTask(loss, model, checkpoint, target, checkpoints_load_func=load_func)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 4, generator=gen), torch.randint(0, 3, (10,), generator=gen)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    attributor = TracInAttributor(task, [1.0], normalized_grad=False)
    attributor.cache()
    return attributor.attribute(loader, loader)


def _lightning_ckpt(path: Path, state: Dict[str, Tensor], prefix: str) -> Path:
    """What Lightning saves: the LightningModule's state dict (its net under ``prefix``) and training state."""
    torch.save(
        {
            "epoch": 3,
            "global_step": 120,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {**{prefix + k: v for k, v in state.items()}, "criterion.weight": torch.ones(3)},
            "optimizer_states": [
                {
                    "state": {0: {"momentum_buffer": torch.zeros(2)}},
                    "param_groups": [{"lr": 0.1, "params": [0]}],
                }
            ],
            "lr_schedulers": [],
            "hyper_parameters": {"lr": 0.1, "hidden": 5},
        },
        path,
    )
    return path


def test_lightning_ddp_and_compiled_checkpoints_give_the_plain_scores(tmp_path: Path) -> None:
    state = _state()
    plain = _scores(state)
    save_file(state, tmp_path / "plain.safetensors")
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "ddp.pt")
    torch.save({"module._orig_mod." + k: v for k, v in state.items()}, tmp_path / "ddp_compiled.pt")
    save_file({"_orig_mod." + k: v for k, v in state.items()}, tmp_path / "compiled.safetensors")
    for source in (
        str(tmp_path / "plain.safetensors"),
        str(_lightning_ckpt(tmp_path / "net.ckpt", state, "net.")),
        str(_lightning_ckpt(tmp_path / "model.ckpt", state, "model.")),
        str(tmp_path / "ddp.pt"),
        str(tmp_path / "ddp_compiled.pt"),
        str(tmp_path / "compiled.safetensors"),
    ):
        assert torch.equal(_scores(source), plain), source
    # the prefix can be given explicitly (checkpoint_prefix=net.)
    assert torch.equal(
        _scores(str(tmp_path / "net.ckpt"), partial(default_checkpoint_load_func, prefix="net.")), plain
    )
    # a different checkpoint gives different scores: the comparison can fail
    assert not torch.equal(_scores({k: v * 2 for k, v in state.items()}), plain)


def test_prefix_is_found_against_the_models_keys() -> None:
    expected = ["body.0.weight", "head.weight"]
    assert find_prefix({"body.0.weight": 0, "head.weight": 0}, expected) == ""
    assert (
        find_prefix({"net.body.0.weight": 0, "net.head.weight": 0, "loss.head.weight": 0}, expected) == "net."
    )
    # a Lightning module holding the net and an EMA copy: the shorter prefix wins a tie
    assert (
        find_prefix(
            {
                "model.head.weight": 0,
                "model.body.0.weight": 0,
                "model_ema.head.weight": 0,
                "model_ema.body.0.weight": 0,
            },
            expected,
        )
        == "model."
    )


def test_mismatches_are_still_refused(tmp_path: Path) -> None:
    state = _state()
    bad = {"net." + k: v for k, v in state.items() if k != "head.bias"}
    bad["net.extra.weight"] = torch.ones(1)
    with pytest.raises(
        CheckpointError,
        match=r"after removing the key prefix 'net.'.*missing keys \['head.bias'\].*unexpected keys \['extra.weight'\]",
    ):
        default_checkpoint_load_func(_model(), bad)
    wrong = dict(state, **{"head.weight": torch.zeros(2, 5)})
    with pytest.raises(CheckpointError, match=r"head.weight \(2, 5\) vs model \(3, 5\)"):
        default_checkpoint_load_func(_model(), wrong)
    with pytest.raises(CheckpointError, match="no checkpoint key starts with the prefix 'model.'"):
        default_checkpoint_load_func(_model(), state, prefix="model.")
    (tmp_path / "notes").mkdir()
    with pytest.raises(CheckpointError, match="none of model.safetensors"):
        load_state_dict_file(tmp_path / "notes")


def _sharded(
    tmp_path: Path, state: Dict[str, Tensor], shard_names=("a.safetensors", "b.safetensors")
) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    keys = sorted(state)
    half = len(keys) // 2
    weight_map = {}
    for name, part in zip(shard_names, (keys[:half], keys[half:])):
        save_file({k: state[k] for k in part}, folder / Path(name).name)
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return folder


def test_sharded_safetensors_directory(tmp_path: Path) -> None:
    state = _state()
    folder = _sharded(tmp_path, state)
    assert torch.equal(_scores(str(folder)), _scores(state))
    (folder / "b.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names shard b.safetensors, which is not in"):
        load_state_dict_file(folder)


def test_shard_names_cannot_leave_the_directory(tmp_path: Path) -> None:
    folder = _sharded(tmp_path, _state(), shard_names=("a.safetensors", "../b.safetensors"))
    with pytest.raises(CheckpointError, match="not a file name inside"):
        load_state_dict_file(folder)


def test_hugging_face_directory_with_tied_weights(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(3)
    saved = transformers.GPT2LMHeadModel(config)
    saved.save_pretrained(tmp_path / "one")
    saved.save_pretrained(tmp_path / "sharded", max_shard_size="1KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = torch.tensor([[1, 2, 3, 4]])
    for folder in ("one", "sharded"):
        on_disk = load_state_dict_file(tmp_path / folder)
        torch.manual_seed(4)
        fresh = transformers.GPT2LMHeadModel(config)
        default_checkpoint_load_func(fresh, str(tmp_path / folder))
        assert fresh.lm_head.weight is fresh.transformer.wte.weight
        with torch.no_grad():
            torch.testing.assert_close(fresh(ids).logits, saved.eval()(ids).logits, rtol=0, atol=0)
        assert "lm_head.weight" not in on_disk  # saved once, filled from its tied twin
