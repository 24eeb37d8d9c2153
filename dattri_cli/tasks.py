"""Loss and target functions for the kinds of model people bring (the future ``task`` config group).

Why: attribution differentiates a training loss and a test-side target, and which
ones depends on what the model does: a classifier's cross-entropy, a regressor's
squared error, a language model's next-token loss, or the loss a Hugging Face model
computes itself from ``labels``. Each builder here returns them in dattri's calling
convention (see :mod:`dattri_cli.task`): ``f(params_dict, data) -> scalar`` where
``data`` is either a batch (influence functions: Hessians, Fisher) or one sample
*without* a batch dimension (TracIn, Grad-Dot, TRAK vmap over samples). A sample is
told from a batch as :func:`dattri_cli.models.train.make_loss_funcs` does: the main
input (``x``, or ``input_ids`` of a dict batch) has ``sample_ndim`` dimensions for
one sample, one more for a batch; a sample is made a batch of one, so the value of
a sample equals the value of that sample as a batch of one.

Batches may be ``(x, y)`` tuples (more than one input: ``(x1, x2, ..., y)``), a bare
tensor (inputs only, for ``causal_lm``), or dictionaries whose ``labels`` entry is the
target and whose other entries are passed to the model by name (``input_ids``,
``attention_mask``, ...). Inputs are never cast: token ids reach the embedding as
integers. Model outputs that are Hugging Face ``ModelOutput`` objects (or tuples)
are unwrapped to their logits. For Hugging Face models a 2-D ``attention_mask`` is
turned into the equivalent additive 4-D mask (:mod:`dattri_cli.models.hf`) so that
per-sample gradients work under ``vmap``.

The L2 term ``weight_decay / 2 * ||params||^2`` is added to the training loss only
when ``weight_decay`` is given and positive (the objective the tool's own training
minimises); the target never has it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from dattri_cli.errors import ConfigError
from dattri_cli.models.hf import is_hf_model, unwrap_logits, unwrap_loss, vmap_safe_inputs
from dattri_cli.models.train import l2_penalty

LossFunc = Callable[[Dict[str, Tensor], Any], Tensor]

#: the label entry of dictionary batches (Hugging Face's name)
LABEL_KEY = "labels"
#: the input of dictionary batches that decides sample vs batch, when present
MAIN_INPUT_KEY = "input_ids"
#: target value marking positions no loss is taken at (Hugging Face's and PyTorch's convention)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TaskFunctions:
    """What a task gives an :class:`~dattri_cli.task.AttributionTask` and TRAK.

    ``correct_probability_func`` is ``p(correct label)`` of one sample (TRAK's
    weighting); only classification has one, other tasks leave it ``None``.
    """

    name: str
    loss_func: LossFunc
    target_func: LossFunc
    correct_probability_func: Optional[LossFunc]
    weight_decay: float


@dataclass
class Call:
    """One batch taken apart: positional inputs, named inputs, labels, and the 2-D mask if any."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    labels: Optional[Tensor]
    mask: Optional[Tensor]


def _main_input(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tensor:
    if isinstance(kwargs.get(MAIN_INPUT_KEY), Tensor):
        return kwargs[MAIN_INPUT_KEY]
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    msg = "a batch must hold at least one input tensor"
    raise TypeError(msg)


def split_batch(data: Any, sample_ndim: int) -> Call:
    """Inputs and labels of ``data``, each sample made a batch of one when ``data`` is one sample.

    ``(x, y)`` / ``(x1, ..., y)`` tuples: the last entry is the label; a one-entry tuple
    or a bare tensor has inputs only; a dictionary's ``labels`` entry is the label and
    the rest are named inputs.
    """
    if isinstance(data, dict):
        kwargs = {k: v for k, v in data.items() if k != LABEL_KEY}
        labels = data.get(LABEL_KEY)
        args: Tuple[Any, ...] = ()
    elif isinstance(data, (tuple, list)):
        items = tuple(data)
        args, labels = (items, None) if len(items) == 1 else (items[:-1], items[-1])
        kwargs = {}
    elif isinstance(data, Tensor):
        args, kwargs, labels = (data,), {}, None
    else:
        msg = f"a batch must be a tensor, a tuple/list or a dict of tensors, got {type(data).__name__}"
        raise TypeError(msg)
    if _main_input(args, kwargs).dim() == sample_ndim:  # one sample (TracIn / TRAK): a batch of one

        def one(value: Any) -> Any:
            return value.unsqueeze(0) if isinstance(value, Tensor) else value

        args = tuple(one(a) for a in args)
        kwargs = {k: one(v) for k, v in kwargs.items()}
        labels = one(labels)
    mask = kwargs.get("attention_mask")
    return Call(args, kwargs, labels, mask if isinstance(mask, Tensor) and mask.dim() == 2 else None)


class ModelCaller:
    """Runs ``model`` functionally on a :class:`Call`: ``functional_call`` with the given parameters.

    ``vmap_masks`` (default: on for Hugging Face models) replaces a 2-D
    ``attention_mask`` with the additive 4-D mask; ``causal`` chooses its causal
    form (default: from the model's attention layers).
    """

    def __init__(
        self, model: nn.Module, vmap_masks: Optional[bool] = None, causal: Optional[bool] = None
    ) -> None:
        """Keep the model and how masks are passed to it."""
        self.model = model
        self.vmap_masks = is_hf_model(model) if vmap_masks is None else vmap_masks
        self.causal = causal

    def __call__(self, params: Dict[str, Tensor], call: Call, with_labels: bool = False) -> Any:
        """The model's raw output on the call's inputs (and ``labels=`` when ``with_labels``)."""
        kwargs = dict(call.kwargs)
        if self.vmap_masks:
            kwargs = vmap_safe_inputs(self.model, kwargs, self.causal)
        if with_labels:
            if call.labels is None:
                msg = "task=model_loss needs labels in the batch (a 'labels' entry, or (inputs, labels))"
                raise TypeError(msg)
            kwargs[LABEL_KEY] = call.labels
        return torch.func.functional_call(self.model, params, call.args, kwargs)


def _labels(call: Call, task: str) -> Tensor:
    if call.labels is None:
        msg = (
            f"task={task} needs labels in the batch: (inputs, labels) tuples or a dict with a 'labels' entry"
        )
        raise TypeError(msg)
    return call.labels


def _with_l2(loss: LossFunc, weight_decay: Optional[float]) -> Tuple[LossFunc, float]:
    """``loss`` plus the L2 term when ``weight_decay`` is given and positive."""
    wd = float(weight_decay or 0.0)
    if wd < 0:
        msg = f"task.weight_decay must be >= 0, got {weight_decay}"
        raise ConfigError(msg)
    if wd == 0.0:
        return loss, 0.0

    def regularised(params: Dict[str, Tensor], data: Any) -> Tensor:
        return loss(params, data) + l2_penalty(params, wd)

    return regularised, wd


def classification(
    model: nn.Module,
    sample_ndim: int = 1,
    weight_decay: Optional[float] = None,
    vmap_masks: Optional[bool] = None,
) -> TaskFunctions:
    """Cross-entropy of ``(B, C)`` logits against integer labels; the target is the same without L2."""
    caller = ModelCaller(model, vmap_masks)

    def cross_entropy(params: Dict[str, Tensor], data: Any) -> Tensor:
        call = split_batch(data, sample_ndim)
        labels = _labels(call, "classification")
        if labels.is_floating_point():
            msg = (
                f"task=classification needs integer class labels, got {labels.dtype}; use "
                "task=regression for float targets"
            )
            raise TypeError(msg)
        return nn.functional.cross_entropy(unwrap_logits(caller(params, call)), labels)

    def correct_probability(params: Dict[str, Tensor], data: Any) -> Tensor:
        return torch.exp(-cross_entropy(params, data))

    loss, wd = _with_l2(cross_entropy, weight_decay)
    return TaskFunctions("classification", loss, cross_entropy, correct_probability, wd)


def regression(
    model: nn.Module,
    sample_ndim: int = 1,
    weight_decay: Optional[float] = None,
    vmap_masks: Optional[bool] = None,
) -> TaskFunctions:
    """Mean squared error between the model's output and float targets (mean over samples and outputs).

    Outputs ``(B, 1)`` against targets ``(B,)`` are compared as ``(B,)``; otherwise
    the shapes must agree. Integer targets are compared as floats.
    """
    caller = ModelCaller(model, vmap_masks)

    def squared_error(params: Dict[str, Tensor], data: Any) -> Tensor:
        call = split_batch(data, sample_ndim)
        target = _labels(call, "regression")
        pred = unwrap_logits(caller(params, call))
        if pred.dim() == target.dim() + 1 and pred.shape[-1] == 1:
            pred = pred.squeeze(-1)
        if pred.shape != target.shape:
            msg = (
                f"task=regression: the model outputs shape {tuple(pred.shape)} but the targets have "
                f"shape {tuple(target.shape)}"
            )
            raise ValueError(msg)
        return ((pred - target.to(pred.dtype)) ** 2).mean()

    loss, wd = _with_l2(squared_error, weight_decay)
    return TaskFunctions("regression", loss, squared_error, None, wd)


def causal_lm(
    model: nn.Module,
    sample_ndim: int = 1,
    weight_decay: Optional[float] = None,
    vmap_masks: Optional[bool] = None,
    ignore_index: int = IGNORE_INDEX,
) -> TaskFunctions:
    """Next-token cross-entropy: each sequence's mean over its non-padding tokens, then the mean over sequences.

    Position ``t`` of the logits predicts token ``t + 1`` of ``labels`` (or of
    ``input_ids`` when the batch has no labels). Tokens whose label is
    ``ignore_index`` or whose ``attention_mask`` is 0 are left out. The target is a
    sequence's mean loss, so a sample's value does not depend on its batch's padding.
    """
    caller = ModelCaller(model, vmap_masks, causal=True)

    def next_token(params: Dict[str, Tensor], data: Any) -> Tensor:
        call = split_batch(data, sample_ndim)
        tokens = call.labels if call.labels is not None else _main_input(call.args, call.kwargs)
        logits = unwrap_logits(caller(params, call))
        shifted, following = logits[:, :-1], tokens[:, 1:]
        keep = following != ignore_index
        if call.mask is not None:
            keep = keep & (call.mask[:, 1:] != 0)
        safe = torch.where(keep, following, torch.zeros_like(following))
        per_token = nn.functional.cross_entropy(
            shifted.reshape(-1, shifted.shape[-1]), safe.reshape(-1), reduction="none"
        )
        weights = keep.to(per_token.dtype)
        per_sequence = (per_token.reshape(following.shape) * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)
        return per_sequence.mean()

    loss, wd = _with_l2(next_token, weight_decay)
    return TaskFunctions("causal_lm", loss, next_token, None, wd)


def model_loss(
    model: nn.Module,
    sample_ndim: int = 1,
    weight_decay: Optional[float] = None,
    vmap_masks: Optional[bool] = None,
) -> TaskFunctions:
    """The model's own loss: called with ``labels=``, its ``outputs.loss`` (Hugging Face models)."""
    caller = ModelCaller(model, vmap_masks)

    def own_loss(params: Dict[str, Tensor], data: Any) -> Tensor:
        return unwrap_loss(caller(params, split_batch(data, sample_ndim), with_labels=True))

    loss, wd = _with_l2(own_loss, weight_decay)
    return TaskFunctions("model_loss", loss, own_loss, None, wd)


#: the ``task`` config group's built-in options
TASKS: Dict[str, Callable[..., TaskFunctions]] = {
    "classification": classification,
    "regression": regression,
    "causal_lm": causal_lm,
    "model_loss": model_loss,
}


def build_task(
    name: str, model: nn.Module, sample_ndim: int = 1, weight_decay: Optional[float] = None, **options: Any
) -> TaskFunctions:
    """The :class:`TaskFunctions` of task ``name`` (one of :data:`TASKS`) for ``model``."""
    if name not in TASKS:
        msg = f"task must be one of {', '.join(TASKS)}, got {name!r}"
        raise ConfigError(msg)
    return TASKS[name](model, sample_ndim=sample_ndim, weight_decay=weight_decay, **options)
