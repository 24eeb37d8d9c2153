"""AttributionTask: the model, its checkpoints and the loss/target functions.

Conventions (those of dattri 0.3.0, so code written for it runs unchanged):

* ``loss_func(params, data)`` and ``target_func(params, data)`` take a dictionary
  of parameters (as for ``torch.func.functional_call``) and data shaped as the
  loader yields it (a tuple, list or dictionary of tensors, or one tensor), and
  return a scalar.
* TracIn, Grad-Dot, Grad-Cos and TRAK call them (and TRAK's
  ``correct_probability_func``) on one sample *without* a batch dimension, vmapped
  over the batch (``in_dims=(None, 0)``). The influence-function attributors call
  them on whole batches (Hessians, Fisher) and, for per-sample gradients, on each
  sample as a batch of one (``in_dims=(None, 1)`` over data of shape
  ``(1, batch_size, ...)``). See :mod:`dattri_cli.func.batch`.
* Parameters are handled as one flat vector per checkpoint; ``layer_name``
  restricts that vector to the named entries of ``model.named_parameters()``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from dattri_cli.errors import CheckpointError
from dattri_cli.func.batch import BATCH_OF_ONE_IN_DIMS
from dattri_cli.func.utils import LayerName, normalize_layer_name, unflatten_params

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
                f"{k} {tuple(state[k].shape)} vs model {tuple(model.state_dict()[k].shape)}"
                for k in wrong_shape
            )
            parts.append(f"keys with a different shape: {shapes}")
        msg = (
            "checkpoint does not fit the model: "
            + "; ".join(parts)
            + " (is `model` the architecture the checkpoint was saved from?)"
        )
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
            self._named_params = {k: p.detach() for k, p in self.model.named_parameters() if p.requires_grad}
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
        param_layer_map: Optional[List[int]] = None,
    ) -> Tuple[Union[Tensor, Tuple[Tensor, ...]], Optional[List[int]]]:
        """Flat parameters of checkpoint ``ckpt_idx`` (restricted to ``layer_name``).

        With ``layer_split`` the result is a tuple of per-parameter flat tensors and
        a map from each to its layer index: parameters sharing a module prefix, or
        ``param_layer_map`` when given (one entry per parameter).
        """
        params = self._load(ckpt_idx)
        names = self.selected_names(layer_name, ckpt_idx)
        if layer_split:
            if param_layer_map:
                if len(param_layer_map) != len(names):
                    msg = f"param_layer_map has {len(param_layer_map)} entries for {len(names)} parameters"
                    raise ValueError(msg)
                layer_of = list(param_layer_map)
            else:
                layer_of = layer_index_map(names)
            return tuple(params[n].reshape(-1) for n in names), layer_of
        return torch.cat([params[n].reshape(-1) for n in names]), None

    def param_shapes(self, layer_name: LayerName = None, ckpt_idx: int = 0) -> Dict[str, torch.Size]:
        """Shapes of the selected parameters, in flat-vector order."""
        params = self._load(ckpt_idx)
        return {n: params[n].shape for n in self.selected_names(layer_name, ckpt_idx)}

    # -- functions of the flat parameter vector ---------------------------------
    def _flat_func(self, func: Callable, layer_name: LayerName, ckpt_idx: Optional[int]) -> Callable:
        """``func`` as a function of the flat vector of the ``layer_name`` parameters.

        The other parameters stay at their values in checkpoint ``ckpt_idx`` (the
        first when None); with ``layer_name=None`` every trainable parameter comes
        from the flat vector, which may also be given as a name -> tensor dictionary.
        """
        idx = 0 if ckpt_idx is None else ckpt_idx
        full = self._load(idx)
        names = self.selected_names(layer_name, idx)
        shapes = {n: full[n].shape for n in names}
        fixed = {k: v for k, v in full.items() if k not in shapes}

        @functools.wraps(func)
        def flat_func(flat: Union[Tensor, Dict[str, Tensor]], data: Any) -> Tensor:
            if isinstance(flat, dict):
                return func({**fixed, **flat}, data)
            params = dict(fixed)
            params.update(unflatten_params(flat, shapes))
            return func(params, data)

        return flat_func

    def _func(
        self, func: Callable, flatten: bool, layer_name: LayerName, ckpt_idx: Optional[int]
    ) -> Callable:
        if not flatten:
            if layer_name is not None:
                msg = "layer_name needs flatten=True: the unflattened function takes every parameter"
                raise NotImplementedError(msg)
            return func
        return self._flat_func(func, layer_name, ckpt_idx)

    def get_loss_func(
        self,
        flatten: bool = True,
        layer_name: LayerName = None,
        ckpt_idx: Optional[int] = None,
    ) -> Callable:
        """``f(flat_params, data) -> loss``; parameters outside ``layer_name`` fixed.

        With ``flatten=False`` the user's own ``loss_func`` (taking a dictionary).
        """
        return self._func(self.original_loss_func, flatten, layer_name, ckpt_idx)

    def get_target_func(
        self,
        flatten: bool = True,
        layer_name: LayerName = None,
        ckpt_idx: Optional[int] = None,
    ) -> Callable:
        """``f(flat_params, data) -> target``; parameters outside ``layer_name`` fixed.

        With ``flatten=False`` the user's own ``target_func`` (taking a dictionary).
        """
        return self._func(self.original_target_func, flatten, layer_name, ckpt_idx)

    def get_grad_loss_func(
        self,
        in_dims: Tuple[Optional[int], ...] = BATCH_OF_ONE_IN_DIMS,
        layer_name: LayerName = None,
        ckpt_idx: Optional[int] = None,
    ) -> Callable:
        """Per-sample loss gradients: ``g(flat_params, data) -> (batch_size, num_params)``.

        ``vmap(grad(loss), in_dims)``: with the default ``(None, 1)`` the data has a
        leading dimension of one, ``(1, batch_size, ...)``, and the loss sees each sample
        as a batch of one; with ``(None, 0)`` it sees each sample without a batch dimension.
        """
        return vmap(
            grad(self.get_loss_func(True, layer_name, ckpt_idx)), in_dims=in_dims, randomness="different"
        )

    def get_grad_target_func(
        self,
        in_dims: Tuple[Optional[int], ...] = BATCH_OF_ONE_IN_DIMS,
        layer_name: LayerName = None,
        ckpt_idx: Optional[int] = None,
    ) -> Callable:
        """Per-sample target gradients, as :meth:`get_grad_loss_func` for ``target_func``."""
        return vmap(
            grad(self.get_target_func(True, layer_name, ckpt_idx)), in_dims=in_dims, randomness="different"
        )

    def register_forward_hook(self, layer_name: Union[str, List[str]]) -> None:
        """Not offered (as in dattri 0.3.0); attributors that need layer inputs hook the model themselves."""
        msg = f"register_forward_hook({layer_name!r}) is not implemented"
        raise NotImplementedError(msg)


def layer_index_map(names: List[str]) -> List[int]:
    """For each parameter name, the index of its layer (consecutive names with one module prefix)."""
    layer_of: List[int] = []
    layers: List[str] = []
    for name in names:
        prefix = name.rsplit(".", 1)[0] if "." in name else ""
        if not layers or layers[-1] != prefix:
            layers.append(prefix)
        layer_of.append(len(layers) - 1)
    return layer_of
