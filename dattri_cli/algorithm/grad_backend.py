"""Per-sample gradient backends of the first-order attributors (TracIn, Grad-Dot, Grad-Cos, TRAK).

* ``"func"``: ``vmap(grad(loss))`` over the batch: the ``(batch, P)`` matrix of every
  parameter's per-sample gradient (dattri's way; exact, simple, memory ``batch x P``).
* ``"layers"``: :class:`~dattri_cli.func.layer_grads.PerSampleLayers`: the task's
  per-sample loss vmapped once with hooks on the model's layers, each layer's inputs and
  output gradients kept, and everything downstream (inner products, norms, projections)
  computed layer by layer: memory ``batch x`` the largest layer, and the
  ``(batch, P)`` matrix is never formed. The same gradients up to float rounding.
* ``"auto"``: ``"layers"`` when it is exactly equivalent (every parameterised module
  has a factored form, BatchNorm in eval mode, no shared parameters, the loss's direct
  dependence on the parameters the same for every sample) and the model has at least
  :data:`AUTO_MIN_PARAMS` parameters (or a Kronecker projection asks for it); ``"func"``
  otherwise, so small models keep their exact numbers.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar, Union

import torch
from torch import Tensor

from dattri_cli.errors import ConfigError
from dattri_cli.func.batch import batch_size_of, index_batch, map_tensors
from dattri_cli.func.kronecker import KroneckerProjector
from dattri_cli.func.layer_grads import (
    LINEAR,
    LayerBackendUnsupported,
    LayerCapture,
    PerSampleLayers,
    check_layer_support,
    module_param_names,
)
from dattri_cli.func.projection import RandomProjector, _RowQueue
from dattri_cli.task import AttributionTask

log = logging.getLogger("dattri_cli")

GRAD_BACKENDS = ("auto", "func", "layers")
#: ``grad_backend="auto"`` uses the layers for models with at least this many trainable parameters.
AUTO_MIN_PARAMS = 1_000_000
#: Bytes of layer captures (inputs and output gradients) held before a dense per-layer projection
#: of the group (:meth:`LayerGradients.feature_stream`): each chunk of the random matrix is drawn
#: once per such group of batches.
DEFAULT_BUFFER_BYTES = 1024 * 2**20
#: How a group's rows meet the dense matrix on the layers backend; part of feature-cache keys, so
#: features rounded by an older rule are never mixed with new ones (2: blocks of exactly
#: ``proj_max_batch_size`` rows, no longer one product per batch).
DENSE_LAYOUT_VERSION = 2
#: The caller's label of a streamed batch (returned untouched).
Key = TypeVar("Key")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(
    dtype: Union[str, torch.dtype, None], device: str, allow_cpu_half: bool = False
) -> torch.dtype:
    """The compute dtype of per-sample gradients and projections (float32 unless asked; half dtypes on GPUs)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        name = str(dtype).replace("torch.", "")
    else:
        name = str(dtype).lower().replace("torch.", "")
    if name not in DTYPES:
        msg = f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}"
        raise ConfigError(msg)
    resolved = DTYPES[name]
    if resolved != torch.float32 and not str(device).startswith("cuda") and not allow_cpu_half:
        msg = (
            f"dtype={name!r} on device {device!r}: half-precision gradients are meant for GPUs (on a CPU "
            "they are slower than float32 and lose precision); use dtype='float32', or allow_cpu_half=True "
            "to insist"
        )
        raise ConfigError(msg)
    return resolved


def check_backend(grad_backend: str) -> str:
    """``grad_backend`` validated (one of :data:`GRAD_BACKENDS`)."""
    if grad_backend not in GRAD_BACKENDS:
        msg = f"grad_backend must be one of {GRAD_BACKENDS}, got {grad_backend!r}"
        raise ConfigError(msg)
    return grad_backend


class LayerGradients:
    """The ``"layers"`` backend for one task: captures per checkpoint and side, and what is computed from them."""

    def __init__(
        self,
        task: AttributionTask,
        layer_name: Any,
        device: str,
        dtype: torch.dtype = torch.float32,
        batch_of_one: bool = False,
    ) -> None:
        """Record the layers covering the ``layer_name`` parameters (all when None) of ``task``'s model.

        ``batch_of_one``: the task's functions see each sample as a batch of one (the
        influence attributors' convention) instead of one sample without a batch dimension.
        """
        self.task = task
        self.batch_of_one = batch_of_one
        self.layer_name = layer_name
        self.device = device
        self.dtype = dtype
        model = task.get_model()
        self.names = task.selected_names(layer_name, 0)
        self.layers = check_layer_support(model, self.names)
        self.recorder = PerSampleLayers(model, self.layers)
        # where each layer's parameters sit in the flat gradient vector (func's layout)
        numel = {n: int(torch.Size(s).numel()) for n, s in task.param_shapes(layer_name, 0).items()}
        position, offset = {}, 0
        for name, size in numel.items():
            position[name] = offset
            offset += size
        self.num_params = offset
        owned = module_param_names(model, self.layers)
        self.starts = {n: position[owned[n][0]] for n in self.layers}
        # each layer's parameters one after the other in the flat vector (true for named_parameters order)
        self.contiguous = all(
            position[b] == position[a] + numel[a] for n in self.layers for a, b in zip(owned[n], owned[n][1:])
        )
        self._setup: Dict[
            Tuple[int, bool], Tuple[Callable, Dict[str, Tensor], Optional[Dict[str, Tensor]]]
        ] = {}

    # -- captures -------------------------------------------------------------------------
    def _func_and_params(
        self, ckpt_idx: int, target: bool, batch: Any
    ) -> Tuple[Callable, Dict, Optional[Dict]]:
        key = (ckpt_idx, target)
        if key not in self._setup:
            getter = self.task.get_target_func if target else self.task.get_loss_func
            func = getter(True, self.layer_name, ckpt_idx)
            if self.batch_of_one:
                func = _with_leading_dim(func)
            named = self.task.named_parameters(ckpt_idx)
            params = {n: named[n].to(self.device) for n in self.names}
            size = batch_size_of(batch)
            samples = [index_batch(batch, i) for i in sorted({0, size - 1})]
            direct = self.recorder.direct_gradient(func, params, samples)
            self._setup = {
                k: v for k, v in self._setup.items() if k[0] == ckpt_idx
            }  # one checkpoint at a time
            self._setup[key] = (func, params, direct)
        return self._setup[key]

    def probe(self, ckpt_idx: int, batch: Any, target: bool) -> None:
        """Run the checks of the first capture now (LayerBackendUnsupported if the loss cannot be captured)."""
        self._func_and_params(ckpt_idx, target, _to(batch, self.device))

    def captures(self, ckpt_idx: int, batch: Any, target: bool) -> Dict[str, LayerCapture]:
        """The layers' captures of one batch (loss for the training side, target for the test side)."""
        batch = _to(batch, self.device)
        func, params, direct = self._func_and_params(ckpt_idx, target, batch)
        caps = self.recorder.capture(func, params, batch, direct)
        if self.dtype != torch.float32:
            for cap in caps.values():
                _cast(cap, self.dtype)
        return caps

    # -- what the attributors need ----------------------------------------------------------
    def flat(self, caps: Dict[str, LayerCapture]) -> Tensor:
        """``(B, P)``: the concatenated per-sample gradients in the flat layout (identity projection, tests)."""
        parts = sorted(
            ((self.starts[n], caps[n].per_sample_grads()) for n in self.layers), key=lambda x: x[0]
        )
        return torch.cat([p.float() for _, p in parts], dim=1)

    def project_dense(
        self, caps: Dict[str, LayerCapture], projector: RandomProjector, ckpt_idx: int
    ) -> Tensor:
        """``(B, proj_dim)``: each layer's gradients times its rows of the dense matrix, added up."""
        return self.project_dense_group([caps], projector, ckpt_idx)[0]

    def project_dense_group(
        self, group: List[Dict[str, LayerCapture]], projector: RandomProjector, ckpt_idx: int
    ) -> List[Tensor]:
        """:meth:`project_dense` of several batches' captures, drawing each chunk of the matrix once for all.

        The layers are walked in order and each chunk of the seeded matrix that covers a
        layer's rows is multiplied with the matching columns of every batch's layer
        gradients; a linear layer's columns are formed from its factors chunk by chunk,
        so the working memory is the group's factors of one layer plus one chunk. A
        chunk beyond the projector's memory budget is drawn once per group, not per batch.

        The group's rows meet each chunk in blocks of exactly ``projector.block_rows`` rows
        (``proj_max_batch_size``; the group's last block zero padded), as
        :meth:`RandomProjector.project_stream` does: one product shape whatever the batch
        sizes and the grouping, so a row's features do not depend on its neighbours, and
        128-row products run ~2.5x faster than 32-row ones on a CPU (docs/benchmarks.md).
        """
        if not self.contiguous:
            msg = "a layer's parameters are not contiguous in the flat parameter vector"
            raise LayerBackendUnsupported(msg)
        if projector.proj_type == "identity":
            return [self.flat(caps) for caps in group]
        if not group:
            return []
        rows_per_chunk, block = projector.chunk_rows, projector.block_rows
        spans = [(n, self.starts[n], self.starts[n] + _Columns.size_of(group[0][n])) for n in self.layers]
        # every chunk index in visiting order (layer by layer), drawn ahead by the projector's threads
        visits = [
            idx
            for _, start, stop in spans
            for idx in range(start // rows_per_chunk, (stop - 1) // rows_per_chunk + 1)
        ]
        device = projector._device_for(_Columns(group[0][self.layers[0]]).like)
        chunks = projector.chunk_sequence(ckpt_idx, visits, self.num_params, device)
        sizes = [caps[self.layers[0]].batch_size for caps in group]
        out = torch.zeros(sum(sizes), projector.proj_dim, dtype=torch.float32, device=device)
        for name, start, stop in spans:
            sources = [_Columns(caps[name]) for caps in group]
            for idx in range(start // rows_per_chunk, (stop - 1) // rows_per_chunk + 1):
                lo = idx * rows_per_chunk
                chunk = next(chunks)
                a, b = max(start, lo), min(stop, lo + chunk.shape[0])
                rows = chunk[a - lo : b - lo]
                queue, done = _RowQueue(), 0
                for source, size in zip(sources, sizes):
                    cols = source.columns(a - start, b - start).to(device=device, dtype=projector.dtype)
                    if cols.shape[0] != size:  # pragma: no cover - captures of one batch agree
                        msg = f"layer {name!r} captured {cols.shape[0]} samples, expected {size}"
                        raise RuntimeError(msg)
                    queue.push(cols)
                    while queue.count >= block:
                        out[done : done + block] += (queue.take(block, pad_to=block) @ rows).float()
                        done += block
                if queue.count:
                    left = queue.count
                    out[done : done + left] += (queue.take(left, pad_to=block) @ rows).float()[:left]
        out.div_(math.sqrt(projector.proj_dim))
        return list(out.split(sizes))

    def features(self, caps: Dict[str, LayerCapture], projector: Any, ckpt_idx: int) -> Tensor:
        """One batch's features: Kronecker, dense (its own draw of the matrix) or, without a projector, flat."""
        if isinstance(projector, KroneckerProjector):
            return projector.project(caps, ckpt_idx).float()
        if projector is None or projector.proj_type == "identity":
            return self.flat(caps)
        return self.project_dense(caps, projector, ckpt_idx)

    def feature_stream(
        self,
        projector: Any,
        ckpt_idx: int,
        entries: Iterable[Tuple[Key, Optional[Any], bool]],
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        scale: Optional[float] = None,
    ) -> Iterator[Tuple[Key, Optional[Tensor]]]:
        """``(key, features / scale)`` for ``(key, batch, target)`` entries, in order (None batches pass as None).

        ``target`` picks the captured function (the target for test batches, the loss for
        training ones), so one stream may mix both sides. With a dense projection the
        batches' captures are held (up to ``buffer_bytes``) and projected together by
        :meth:`project_dense_group`, so each chunk of the random matrix is drawn once per
        group rather than once per batch; a batch's features are the same bits either way.
        Kronecker and flat features come out batch by batch.
        """
        dense = (
            projector is not None
            and not isinstance(projector, KroneckerProjector)
            and projector.proj_type != "identity"
        )
        pending: List[Tuple[Key, Any]] = []
        held = 0

        def scaled(features: Tensor) -> Tensor:
            return features if scale is None else features / scale

        def flush() -> Iterator[Tuple[Key, Optional[Tensor]]]:
            group = [item for _, item in pending if isinstance(item, dict)]
            projected = iter(self.project_dense_group(group, projector, ckpt_idx) if group else ())
            for key, item in pending:
                yield key, (scaled(next(projected)) if isinstance(item, dict) else item)
            pending.clear()

        for key, batch, target in entries:
            if batch is None:
                pending.append((key, None))
            else:
                caps = self.captures(ckpt_idx, batch, target)
                if dense:
                    pending.append((key, caps))
                    held += capture_bytes(caps)
                else:
                    pending.append((key, scaled(self.features(caps, projector, ckpt_idx))))
            if not dense or held >= buffer_bytes:
                yield from flush()
                held = 0
        yield from flush()

    def feature_dim(self, projector: Any) -> int:
        """Width of the projected features (before any gradient is computed)."""
        if isinstance(projector, KroneckerProjector):
            total = 0
            for n in self.layers:
                cap = LayerCapture(n, self.recorder.modules[n], self.recorder.kinds[n])
                dims = projector.layer_dims(cap)
                total += dims[0] * dims[1] if len(dims) == 2 else dims[0]
            return total
        if projector is None or projector.proj_type == "identity":
            return self.num_params
        return projector.proj_dim


class _Columns:
    """Column ranges of one layer's ``(B, P_layer)`` per-sample gradients (the flat layout), formed on demand.

    A linear layer's weight columns ``[s, e)`` are rows of ``G = sum_t d_t a_t^T`` and come
    from the factors (only the output rows spanned); other layers are materialised once.
    """

    def __init__(self, cap: LayerCapture) -> None:
        self.cap = cap
        self.size = self.size_of(cap)
        self._full: Optional[Tensor] = None
        self._factors: Optional[Tuple[Tensor, Tensor]] = None
        self.like = cap.inputs[0][0] if cap.inputs[0][0].is_floating_point() else cap.outgrads[0][0]

    @staticmethod
    def size_of(cap: LayerCapture) -> int:
        """Number of trainable parameters of the captured layer (its width in the flat layout)."""
        return sum(int(p.numel()) for p in cap.module.parameters(recurse=False) if p.requires_grad)

    def columns(self, s: int, e: int) -> Tensor:
        cap = self.cap
        if cap.kind != LINEAR:
            if self._full is None:
                self._full = cap.per_sample_grads()
            return self._full[:, s:e]
        if self._factors is None:
            self._factors = cap.factors()
        a, d = self._factors
        in_w = a.shape[-1] - int(cap.has_bias)
        weight = int(cap.module.weight.numel())
        parts = []
        if s < weight:
            w_end = min(e, weight)
            o0, o1 = s // in_w, -(-w_end // in_w)
            block = torch.einsum("bto,bti->boi", d[:, :, o0:o1], a[:, :, :in_w]).reshape(a.shape[0], -1)
            parts.append(block[:, s - o0 * in_w : w_end - o0 * in_w])
        if e > weight:
            parts.append(d.sum(dim=1)[:, max(s, weight) - weight : e - weight])
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if cap.offset is not None:
            out = out + cap.offset[s:e].to(out.dtype)
        return out


def _with_leading_dim(func: Callable) -> Callable:
    """``func(params, sample)`` called with every tensor of the sample given a leading dimension of one."""

    def wrapped(params: Any, sample: Any) -> Any:
        return func(params, map_tensors(lambda t: t.unsqueeze(0), sample))

    return wrapped


def _to(batch: Any, device: str) -> Any:
    moved = map_tensors(lambda t: t.to(device), batch)
    return tuple(moved) if isinstance(moved, list) else moved


def capture_bytes(caps: Dict[str, LayerCapture]) -> int:
    """Memory held by a batch's captures (layer inputs and output gradients)."""
    total = 0
    for cap in caps.values():
        for xs in cap.inputs:
            total += sum(x.numel() * x.element_size() for x in xs)
        for ds in cap.outgrads:
            total += sum(d.numel() * d.element_size() for d in ds if d is not None)
    return total


def _cast(cap: LayerCapture, dtype: torch.dtype) -> None:
    """A capture's floating tensors in ``dtype`` (token ids stay integers)."""

    def cast(t: Optional[Tensor]) -> Optional[Tensor]:
        return t.to(dtype) if t is not None and t.is_floating_point() else t

    cap.inputs = [tuple(cast(x) for x in xs) for xs in cap.inputs]
    cap.outgrads = [[cast(d) for d in ds] for ds in cap.outgrads]
    if cap.offset is not None:
        cap.offset = cap.offset.to(dtype)


def choose_backend(
    requested: str,
    task: AttributionTask,
    layer_name: Any,
    device: str,
    dtype: torch.dtype,
    needs_layers: bool,
    probe_batch: Optional[Callable[[], Any]] = None,
    batch_of_one: bool = False,
) -> Optional[LayerGradients]:
    """The layers backend (a :class:`LayerGradients`) or None for ``"func"``.

    ``needs_layers`` (a Kronecker projection) turns ``"auto"`` into ``"layers"``.
    ``probe_batch()`` gives a training batch on which the loss is checked before any
    work (the layers must all be called; a direct parameter term must not depend on
    the sample). With ``"layers"`` (or a Kronecker projection) an unsupported model
    is a ConfigError naming the reason; ``"auto"`` then quietly uses ``"func"``.
    ``batch_of_one``: see :class:`LayerGradients`.
    """
    check_backend(requested)
    if requested == "func":
        if needs_layers:
            msg = 'projector_kwargs["proj_type"]="kronecker" needs grad_backend="layers" (or "auto")'
            raise ConfigError(msg)
        return None
    model = task.get_model()
    task.get_param(0)  # the first checkpoint loaded (BatchNorm statistics, eval mode)
    if requested == "auto" and not needs_layers:
        selected = task.selected_names(layer_name, 0)
        shapes = task.param_shapes(layer_name, 0)
        if sum(int(torch.Size(s).numel()) for s in shapes.values()) < AUTO_MIN_PARAMS:
            return None
        try:
            check_layer_support(model, selected, allow_fallback=False)
        except LayerBackendUnsupported:
            return None
    try:
        layers = LayerGradients(task, layer_name, device, dtype, batch_of_one=batch_of_one)
        if probe_batch is not None:
            batch = probe_batch()
            if batch is not None:
                layers.probe(0, batch, target=False)
                layers.probe(0, batch, target=True)
    except LayerBackendUnsupported as exc:
        if requested == "auto" and not needs_layers:
            log.info("grad_backend=auto: per-sample gradients through torch.func (%s)", exc)
            return None
        why = "Kronecker projection" if needs_layers else 'grad_backend="layers"'
        msg = f'{why} cannot capture this model layer by layer: {exc}; use grad_backend="func"'
        if needs_layers:
            msg += ' with a dense projector_kwargs["proj_type"]'
        raise ConfigError(msg) from exc
    return layers


def first_batch(loader: Any) -> Any:
    """The first batch of a loader (None when empty)."""
    for batch in loader:
        return batch
    return None


__all__: List[str] = [
    "AUTO_MIN_PARAMS",
    "DTYPES",
    "GRAD_BACKENDS",
    "LayerGradients",
    "check_backend",
    "choose_backend",
    "first_batch",
    "resolve_dtype",
]


class ChoosesGradBackend:
    """For attributors with a ``grad_backend`` option: decide once where per-sample gradients come from.

    Expects ``grad_backend``, ``task``, ``layer_name``, ``device``, ``dtype``, ``projector``,
    ``_layers`` and ``_backend_chosen`` on the instance (TracIn and TRAK set them).
    """

    def _choose_backend(self, train_dataloader: Optional[Any]) -> Optional[LayerGradients]:
        """The layers backend or None (``torch.func``), decided once, on the first training batch."""
        if not self._backend_chosen:
            self._layers = choose_backend(
                self.grad_backend,
                self.task,
                self.layer_name,
                self.device,
                self.dtype,
                needs_layers=isinstance(self.projector, KroneckerProjector),
                probe_batch=(lambda: first_batch(train_dataloader)) if train_dataloader is not None else None,
            )
            self._backend_chosen = True
        return self._layers

    def _layout_key(self, backend_key: Tuple[str, str]) -> Dict[str, Any]:
        """The feature-cache key entries that tell apart features rounded by different layouts.

        The Kronecker layout version; on the layers backend ``backend_key`` (the caller's own
        entry, e.g. ``("calls", "layers")``), the dense layout version and a non-float32 dtype:
        per-layer sums round differently from torch.func's, so they are never shared.
        """
        extra: Dict[str, Any] = {}
        if isinstance(self.projector, KroneckerProjector):
            extra["kronecker_layout"] = KroneckerProjector.LAYOUT_VERSION
        if self._layers is not None:
            extra[backend_key[0]] = backend_key[1]
            if isinstance(self.projector, RandomProjector) and self.projector.proj_type != "identity":
                extra["dense_layout"] = DENSE_LAYOUT_VERSION
            if self.dtype != torch.float32:
                extra["dtype"] = str(self.dtype)
        return extra
