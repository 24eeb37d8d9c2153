"""Parameter flattening and per-sample gradients: the glue between models and solvers.

Attribution works on one flat parameter vector per checkpoint; user code works on
``{name: tensor}`` dictionaries for ``torch.func.functional_call``. The helpers here
convert between the two without copying more than needed.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from dattri_cli.func.batch import BATCH_OF_ONE_IN_DIMS, SAMPLE_IN_DIMS, add_leading_dim

LayerName = Optional[Union[str, List[str]]]


def normalize_layer_name(layer_name: LayerName) -> Optional[List[str]]:
    """Turn ``None | str | list[str]`` into ``None | list[str]``."""
    if layer_name is None:
        return None
    if isinstance(layer_name, str):
        return [layer_name]
    return list(layer_name)


def flatten_params(tensors: Dict[str, Tensor]) -> Tensor:
    """Concatenate a parameter dictionary into one 1-d tensor (in insertion order)."""
    if not tensors:
        msg = "cannot flatten an empty parameter dictionary"
        raise ValueError(msg)
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten_params(
    flat: Tensor,
    shapes: Dict[str, torch.Size],
) -> Dict[str, Tensor]:
    """Split a flat vector back into named views with the given shapes."""
    sizes = [shape.numel() for shape in shapes.values()]
    if sum(sizes) != flat.numel():
        msg = f"flat vector has {flat.numel()} entries, the shapes need {sum(sizes)}"
        raise ValueError(msg)
    # split (not slicing): its backward is one concatenation, where each slice's
    # backward would fill a full-size zero buffer; under vmap that dominated Grad-Dot
    pieces = flat.split(sizes)
    return {name: piece.view(shape) for (name, shape), piece in zip(shapes.items(), pieces)}


def trainable_shapes(model: nn.Module) -> Dict[str, torch.Size]:
    """Names and shapes of the parameters that require gradients."""
    return {k: p.shape for k, p in model.named_parameters() if p.requires_grad}


def flatten_func(model: nn.Module, param_num: int = 0) -> Callable:
    """Decorate ``f(params_dict, ...)`` so that it takes a flat vector instead.

    The argument at position ``param_num`` may be a flat tensor (all trainable
    parameters of ``model`` in ``named_parameters`` order) or already a dictionary,
    which is passed through unchanged.
    """
    shapes = trainable_shapes(model)

    def decorator(function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            args = list(args)
            if isinstance(args[param_num], Tensor):
                args[param_num] = unflatten_params(args[param_num], shapes)
            return function(*args, **kwargs)

        return wrapped

    return decorator


def partial_param(
    full_param: Dict[str, Tensor],
    layer_name: Sequence[str],
    param_num: int = 0,
) -> Callable:
    """Decorate a function of the full flat vector so it takes only some layers.

    The parameters not in ``layer_name`` stay fixed at their values in
    ``full_param``; the decorated function takes the flat concatenation of the
    ``layer_name`` parameters at position ``param_num``.
    """
    names = list(full_param)
    selected = list(layer_name)

    def decorator(function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            args = list(args)
            pieces = dict(full_param)
            offset = 0
            part = args[param_num]
            for name in selected:
                n = full_param[name].numel()
                pieces[name] = part[offset : offset + n].view(full_param[name].shape)
                offset += n
            args[param_num] = torch.cat([pieces[k].reshape(-1) for k in names])
            return function(*args, **kwargs)

        return wrapped

    return decorator


def per_sample_grad(func: Callable, params: Any, data: Any, batch_of_one: bool = True) -> Tensor:
    """Gradients of ``func(params, ...)`` for every sample of the batch ``data``.

    With ``batch_of_one`` each sample is presented as a batch of one (the
    influence-function convention: one function serves per-sample gradients and
    full-batch Hessians); otherwise as one sample without a batch dimension (the
    TracIn / TRAK convention). Returns a ``(batch_size, num_params)`` tensor for a
    flat ``params``.
    """
    if batch_of_one:
        return vmap(grad(func), in_dims=BATCH_OF_ONE_IN_DIMS, randomness="different")(
            params, add_leading_dim(data)
        )
    return vmap(grad(func), in_dims=SAMPLE_IN_DIMS, randomness="different")(params, data)


def per_sample_value(func: Callable, params: Any, data: Any, batch_of_one: bool = True) -> Tensor:
    """``func(params, sample)`` for every sample of ``data`` (conventions as :func:`per_sample_grad`), flattened."""
    if batch_of_one:
        values = vmap(func, in_dims=BATCH_OF_ONE_IN_DIMS, randomness="different")(
            params, add_leading_dim(data)
        )
    else:
        values = vmap(func, in_dims=SAMPLE_IN_DIMS, randomness="different")(params, data)
    return values.reshape(values.shape[0], -1)[:, 0] if values.dim() > 1 else values
