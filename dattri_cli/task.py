"""AttributionTask: the model, its checkpoints and the loss/target functions.

Conventions (the same for every attributor in this package):

* ``loss_func(params, data)`` and ``target_func(params, data)`` take a dictionary
  of parameters (as for ``torch.func.functional_call``) and a tuple of tensors with
  a leading batch dimension, and return a scalar: the *mean* loss over the batch.
* Per-sample quantities present each sample as a batch of one, so one function
  serves per-sample gradients and full-batch losses (Hessians, Fisher).
* Parameters are handled as one flat vector per checkpoint; ``layer_name``
  restricts that vector to the named entries of ``model.named_parameters()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from dattri_cli.errors import CheckpointError
from dattri_cli.func.utils import (
    LayerName,
    normalize_layer_name,
    per_sample_grad,
    unflatten_params,
)

Checkpoint = Union[str, Path, Dict[str, Tensor]]


def load_state_dict_file(path: Union[str, Path]) -> Dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or ``.pt``/``.pth`` without running code."""
    path = Path(path)
    if not path.is_file():
        msg = f"checkpoint file not found: {path} (check the path, or leave `checkpoint` unset to train one)"
        raise CheckpointError(msg)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a truncated or malformed file is the user's
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            msg = f"could not read checkpoint {path} as safetensors (empty, truncated or not safetensors: {reason}); save it again"
            raise CheckpointError(msg) from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the user's file
        from dattri_cli.errors import torch_load_refusal

        raise CheckpointError(torch_load_refusal(path, exc, "checkpoint")) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        msg = f"checkpoint {path} does not hold a state dict of tensors"
        raise CheckpointError(msg)
    return state


def default_checkpoint_load_func(model: nn.Module, checkpoint: Checkpoint) -> nn.Module:
    """Load ``checkpoint`` (state dict or path) into ``model`` strictly, in eval mode."""
    state = checkpoint if isinstance(checkpoint, dict) else load_state_dict_file(checkpoint)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    wrong_shape = sorted(
        k for k in expected & set(state) if tuple(state[k].shape) != tuple(model.state_dict()[k].shape)
    )
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if wrong_shape:
            shapes = ", ".join(
                f"{k} {tuple(state[k].shape)} vs model {tuple(model.state_dict()[k].shape)}" for k in wrong_shape
            )
            parts.append(f"keys with a different shape: {shapes}")
        msg = "checkpoint does not fit the model: " + "; ".join(parts) + " (is `model` the architecture the checkpoint was saved from?)"
        raise CheckpointError(msg)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


class AttributionTask:
    """Everything an attributor needs to know about the trained model(s)."""

    def __init__(
        self,
        loss_func: Callable,
        model: nn.Module,
        checkpoints: Union[Checkpoint, List[Checkpoint]],
        target_func: Optional[Callable] = None,
        checkpoints_load_func: Optional[Callable] = None,
    ) -> None:
        """Bundle the loss (train side) and target (test side) functions with checkpoints.

        Args:
            loss_func: ``loss_func(params_dict, batch) -> scalar`` mean training loss.
            model: the architecture; its weights are replaced by each checkpoint.
            checkpoints: a state dict, a path, or a list of either (an ensemble, or
                the checkpoints along one training run for TracIn).
            target_func: the quantity attributed on test samples; defaults to
                ``loss_func``.
            checkpoints_load_func: ``f(model, checkpoint) -> model``; defaults to a
                strict ``load_state_dict`` with a readable error on mismatch.
        """
        self.model = model
        self.original_loss_func = loss_func
        self.original_target_func = target_func if target_func is not None else loss_func
        self.checkpoints_load_func = checkpoints_load_func or default_checkpoint_load_func
        self.checkpoints: List[Checkpoint] = (
            list(checkpoints) if isinstance(checkpoints, (list, tuple)) else [checkpoints]
        )
        if not self.checkpoints:
            msg = "AttributionTask needs at least one checkpoint"
            raise CheckpointError(msg)
        self._loaded_idx: Optional[int] = None
        self._named_params: Dict[str, Tensor] = {}

    # -- checkpoints -------------------------------------------------------------
    def get_checkpoints(self) -> List[Checkpoint]:
        """The checkpoints of the task, in order."""
        return self.checkpoints

    def get_model(self) -> nn.Module:
        """The model (holding the most recently loaded checkpoint)."""
        return self.model

    def _load(self, ckpt_idx: int) -> Dict[str, Tensor]:
        if self._loaded_idx != ckpt_idx:
            model = self.checkpoints_load_func(self.model, self.checkpoints[ckpt_idx])
            if model is not None:
                self.model = model
            self._named_params = {
                k: p.detach() for k, p in self.model.named_parameters() if p.requires_grad
            }
            self._loaded_idx = ckpt_idx
        return self._named_params

    def named_parameters(self, ckpt_idx: int = 0) -> Dict[str, Tensor]:
        """Trainable parameters of checkpoint ``ckpt_idx`` as a (detached) dictionary."""
        return dict(self._load(ckpt_idx))

    def selected_names(self, layer_name: LayerName, ckpt_idx: int = 0) -> List[str]:
        """The parameter names ``layer_name`` selects (all trainable ones for None)."""
        params = self._load(ckpt_idx)
        names = normalize_layer_name(layer_name)
        if names is None:
            return list(params)
        unknown = [n for n in names if n not in params]
        if unknown:
            msg = f"layer_name {unknown} not among the model's trainable parameters {list(params)}"
            raise CheckpointError(msg)
        return names

    def get_param(
        self,
        ckpt_idx: int = 0,
        layer_name: LayerName = None,
        layer_split: bool = False,
    ) -> Tuple[Union[Tensor, Tuple[Tensor, ...]], Optional[List[int]]]:
        """Flat parameters of checkpoint ``ckpt_idx`` (restricted to ``layer_name``).

        With ``layer_split`` the result is a tuple of per-parameter flat tensors and
        a map from each to its layer index (parameters sharing a module prefix).
        """
        params = self._load(ckpt_idx)
        names = self.selected_names(layer_name, ckpt_idx)
        if layer_split:
            layer_of, layers = [], []
            for name in names:
                prefix = name.rsplit(".", 1)[0] if "." in name else name
                if not layers or layers[-1] != prefix:
                    layers.append(prefix)
                layer_of.append(len(layers) - 1)
            return tuple(params[n].reshape(-1) for n in names), layer_of
        return torch.cat([params[n].reshape(-1) for n in names]), None

    def param_shapes(self, layer_name: LayerName = None, ckpt_idx: int = 0) -> Dict[str, torch.Size]:
        """Shapes of the selected parameters, in flat-vector order."""
        params = self._load(ckpt_idx)
        return {n: params[n].shape for n in self.selected_names(layer_name, ckpt_idx)}

    # -- functions of the flat parameter vector ---------------------------------
    def _flat_func(self, func: Callable, layer_name: LayerName, ckpt_idx: Optional[int]) -> Callable:
        idx = 0 if ckpt_idx is None else ckpt_idx
        full = self._load(idx)
        names = self.selected_names(layer_name, idx)
        shapes = {n: full[n].shape for n in names}
        fixed = {k: v for k, v in full.items() if k not in shapes}

        def flat_func(flat: Tensor, data: Tuple[Tensor, ...]) -> Tensor:
            params = dict(fixed)
            params.update(unflatten_params(flat, shapes))
            return func(params, data)

        return flat_func

    def get_loss_func(self, layer_name: LayerName = None, ckpt_idx: Optional[int] = None) -> Callable:
        """``f(flat_params, batch) -> mean loss``; parameters outside ``layer_name`` fixed."""
        return self._flat_func(self.original_loss_func, layer_name, ckpt_idx)

    def get_target_func(self, layer_name: LayerName = None, ckpt_idx: Optional[int] = None) -> Callable:
        """``f(flat_params, batch) -> mean target``; parameters outside ``layer_name`` fixed."""
        return self._flat_func(self.original_target_func, layer_name, ckpt_idx)

    def get_grad_loss_func(self, layer_name: LayerName = None, ckpt_idx: Optional[int] = None) -> Callable:
        """``g(flat_params, batch) -> (batch_size, num_params)`` per-sample loss gradients."""
        func = self.get_loss_func(layer_name, ckpt_idx)
        return lambda flat, data: per_sample_grad(func, flat, data)

    def get_grad_target_func(self, layer_name: LayerName = None, ckpt_idx: Optional[int] = None) -> Callable:
        """``g(flat_params, batch) -> (batch_size, num_params)`` per-sample target gradients."""
        func = self.get_target_func(layer_name, ckpt_idx)
        return lambda flat, data: per_sample_grad(func, flat, data)
