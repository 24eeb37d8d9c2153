"""Per-layer per-sample gradients from one batched forward and backward pass.

For a batch of ``B`` samples with per-sample losses ``l_i``, one backward pass of
``sum_i l_i`` gives every layer's output gradient ``d_i = dl_i / dy_i`` for each
sample separately (samples do not interact in the forward pass), and a forward
hook keeps each sample's layer input ``a_i``. The per-sample parameter gradients
then follow layer by layer, without the ``(B, P)`` matrix of all of them:

* ``nn.Linear`` (``y_t = W a_t + b`` at positions ``t``; one position for a
  ``(B, in)`` input, ``T`` for ``(B, T, in)``): ``grad_W l_i = sum_t d_it a_it^T``,
  ``grad_b l_i = sum_t d_it``. With a 1 appended to ``a`` for the bias both are one
  outer-product sum ``sum_t d_it [a_it; 1]^T``.
* ``nn.Conv2d`` (``groups=1``, zero or no padding): the same with ``a_it`` the
  unfolded input patch (``C * kh * kw`` values, channel-major like
  ``weight.reshape(out, -1)``) and ``t`` the ``L`` output positions.
* ``nn.Embedding``: ``grad_E l_i = sum_t e_{id_it} d_it^T``, the output gradients
  scatter-added into the rows of the token ids used (``a_it`` is the one-hot id).
* ``nn.LayerNorm``: with the normalised input ``xhat = (x - mean) / sqrt(var + eps)``,
  ``grad_w l_i = sum_t d_it * xhat_it`` and ``grad_b l_i = sum_t d_it`` (elementwise).
* ``nn.BatchNorm1d/2d/3d`` in eval mode (an affine map per channel with the running
  statistics): the same with ``xhat = (x - running_mean) / sqrt(running_var + eps)``
  and ``t`` the positions of a channel.
* any other module with parameters of its own: ``torch.func`` per-sample gradients
  of those parameters only, ``vmap`` over samples of the vector-Jacobian product of
  the module's output (at its recorded input) with the recorded output gradient.

Inner products of per-sample gradients of two sample sets come straight from the
factors: for Linear, Conv2d and Embedding

``<g_i, g_j> = sum_{t,s} (a_it . a_js) (d_it . d_js)``

(for the Embedding ``a_it . a_js`` is ``[id_it == id_js]``), which costs
``B_1 B_2 T S (in + out)`` instead of forming ``g`` (``out * in`` per sample). When
the positions are many (``T S > in out / (in + out)``, typical for early
convolutions) the per-sample gradient of the layer alone, ``(B, out, in)``, is cheaper
and is formed instead; either way memory is bounded by the batch times the largest
layer (times the positions), never by the batch times the whole model.

Scaling: the per-sample gradient here is always the gradient of the sample's own
loss ``l_i``. ``loss_fn`` may return the vector of ``l_i`` (``reduction="none"``), their
sum (``"sum"``) or their mean (``"mean"``: the scalar is multiplied by ``B`` before the
backward pass, so the factors are those of ``l_i``, not of ``l_i / B``).

Requirements: samples must not interact in the forward pass (no BatchNorm in
training mode; this is checked), every recorded tensor must have the batch as its
leading dimension, and a parameter may belong to one recorded layer only (tied
weights across two modules are refused). A module called several times in one
forward pass (a shared layer) is handled: its uses are concatenated along the
positions for the factored kinds and summed for the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn import functional as F

from dattri_cli.errors import ConfigError

#: Kinds of layers whose per-sample gradients are factored.
LINEAR, EMBEDDING, LAYERNORM, BATCHNORM, FALLBACK = (
    "linear",
    "embedding",
    "layernorm",
    "batchnorm",
    "fallback",
)
REDUCTIONS = ("none", "sum", "mean")


def layer_kind(module: nn.Module) -> Optional[str]:
    """How the per-sample gradients of ``module``'s own parameters are computed (None: no trainable ones)."""
    own = [p for p in module.parameters(recurse=False) if p.requires_grad]
    if not own:
        return None
    all_trained = all(p.requires_grad for p in module.parameters(recurse=False))
    if not all_trained:  # a frozen weight next to a trained bias: only torch.func knows which is which
        return FALLBACK
    if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and _conv_factorable(module)):
        return LINEAR
    if isinstance(module, nn.Embedding) and not module.scale_grad_by_freq:
        return EMBEDDING
    if isinstance(module, nn.LayerNorm):
        return LAYERNORM
    is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
    if is_bn and not module.training and module.running_mean is not None and module.running_var is not None:
        return BATCHNORM
    return FALLBACK


def _conv_factorable(module: nn.Conv2d) -> bool:
    if module.groups != 1 or module.padding_mode != "zeros":
        return False
    return not (isinstance(module.padding, str) and module.padding != "valid")


def param_names(module: nn.Module) -> List[str]:
    """The module's own trainable parameter names, in the flat layout of the per-sample gradients."""
    return [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]


@dataclass
class LayerCapture:
    """What one forward and backward pass recorded for one layer.

    ``inputs[u]`` and ``outgrads[u]`` belong to the ``u``-th call of the module in
    the forward pass (several for a shared layer). Factors are derived on demand,
    so a convolution's unfolded patches exist only while that layer is consumed.
    """

    name: str
    module: nn.Module
    kind: str
    inputs: List[Tuple[Tensor, ...]] = field(default_factory=list)
    outgrads: List[List[Optional[Tensor]]] = field(default_factory=list)
    #: module calls per sample: recorded rows ``(B * group, ...)`` belong to ``B`` samples
    #: (a per-sample loss calling the model on a batch of one has ``group == 1`` rows each)
    group: int = 1
    #: fallback layers: ``inputs`` are per-sample inputs (``(B, ...)`` of what one sample's
    #: module call received), not rows of a batched call
    sample_inputs: bool = False
    #: ``(P_layer,)`` added to every sample's gradient: the loss's direct dependence on the
    #: parameters outside the module's forward pass (an L2 penalty), the same for all samples
    offset: Optional[Tensor] = None

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def batch_size(self) -> int:
        return int(self.inputs[0][0].shape[0]) // max(1, self.group)

    def factors(self) -> Tuple[Tensor, Tensor]:
        """``(a, d)`` per sample and position, the uses of a shared layer concatenated along positions.

        Linear / Conv2d: ``a`` is ``(B, T, in[+1])`` (a trailing 1 for the bias),
        ``d`` is ``(B, T, out)``. Embedding: ``a`` is the ``(B, T)`` token ids (long)
        and ``d`` is ``(B, T, dim)``; ids equal to ``padding_idx`` get a zero ``d``.
        LayerNorm: ``a`` is the normalised input ``(B, T, D)``, ``d`` is ``(B, T, D)``
        (``D`` the flattened ``normalized_shape``). BatchNorm (eval): the same with
        ``D`` the channels and ``T`` the positions.
        """
        if self.kind == FALLBACK:
            msg = f"layer {self.name!r} ({type(self.module).__name__}) has no factors; use per_sample_grads"
            raise ValueError(msg)
        a_parts, d_parts = [], []
        for inputs, grads in zip(self.inputs, self.outgrads):
            x, d = inputs[0], _first_grad(grads)
            a, d = _factor_one_use(self.module, self.kind, x, d)
            if self.group > 1:  # rows of one sample's calls become positions of that sample
                b = a.shape[0] // self.group
                a = a.reshape(b, -1, *a.shape[2:])
                d = d.reshape(b, -1, d.shape[-1])
            a_parts.append(a)
            d_parts.append(d)
        if len(a_parts) == 1:
            return a_parts[0], d_parts[0]
        return torch.cat(a_parts, dim=1), torch.cat(d_parts, dim=1)

    def factor_shape(self) -> Tuple[int, int, int, int]:
        """``(B, T, in[+1], out)`` of a linear (or convolution) layer's factors, without unfolding anything."""
        if self.kind != LINEAR:
            msg = f"factor_shape is for linear and convolution layers, not {self.kind}"
            raise ValueError(msg)
        weight = self.module.weight
        k_in = int(weight[0].numel()) + int(self.has_bias)
        k_out = int(weight.shape[0])
        positions = 0
        for grads in self.outgrads:
            d = _first_grad(grads)
            if isinstance(self.module, nn.Conv2d):
                positions += int(d[0].numel()) // k_out  # rows of d are (out, H', W') per call row
            else:
                positions += int(d.numel()) // (int(d.shape[0]) * k_out)
        batch = self.batch_size
        rows_per_sample = int(_first_grad(self.outgrads[0]).shape[0]) // max(1, batch)
        return batch, positions * rows_per_sample, k_in, k_out

    def per_sample_grads(self) -> Tensor:
        """``(B, P_layer)``: the materialised per-sample gradient of this layer's parameters.

        Layout: the module's own trainable parameters in registration order
        (``weight`` then ``bias``), each flattened row-major, as ``torch.func`` gives them.
        """
        g = self._grads_without_offset()
        return g if self.offset is None else g + self.offset.to(g.dtype)

    def _grads_without_offset(self) -> Tensor:
        if self.kind == FALLBACK:
            return _fallback_grads(self)
        a, d = self.factors()
        if self.kind == LINEAR:
            g = torch.einsum("bto,bti->boi", d, a)
            if self.has_bias:
                return torch.cat([g[:, :, :-1].reshape(g.shape[0], -1), g[:, :, -1]], dim=1)
            return g.reshape(g.shape[0], -1)
        if self.kind == EMBEDDING:
            num, dim = self.module.weight.shape
            g = d.new_zeros(d.shape[0], num, dim)
            g.scatter_add_(1, a.unsqueeze(-1).expand(-1, -1, dim), d)
            return g.reshape(d.shape[0], -1)
        gw = (d * a).sum(dim=1)
        parts = [gw] + ([d.sum(dim=1)] if self.has_bias else [])
        return torch.cat(parts, dim=1)


def _first_grad(grads: Sequence[Optional[Tensor]]) -> Tensor:
    g = grads[0]
    if g is None:  # pragma: no cover - filled with zeros by capture()
        msg = "a recorded layer output got no gradient"
        raise RuntimeError(msg)
    return g


def unfold(
    x: Tensor,
    kernel_size: Tuple[int, int],
    dilation: Tuple[int, int],
    padding: Tuple[int, int],
    stride: Tuple[int, int],
) -> Tensor:
    """``F.unfold(x, ...)`` (``(B, C kh kw, L)``, the same bits: a copy) from a strided view of ``x``.

    ``F.unfold``'s CPU im2col took 5-10x longer on ResNet-18's layers than copying this view
    (docs/benchmarks.md, "TRAK / TracIn projections at millions of parameters").
    """
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel_size, dilation, padding, stride
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x.contiguous()
    b, c, h, w = xp.shape
    out_h, out_w = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s = xp.stride()
    view = xp.as_strided(
        (b, c, kh, kw, out_h, out_w), (s[0], s[1], s[2] * dh, s[3] * dw, s[2] * sh, s[3] * sw)
    )
    return view.reshape(b, c * kh * kw, out_h * out_w)


def _factor_one_use(module: nn.Module, kind: str, x: Tensor, d: Tensor) -> Tuple[Tensor, Tensor]:
    b = x.shape[0]
    if kind == LINEAR:
        if isinstance(module, nn.Conv2d):
            padding = (0, 0) if module.padding == "valid" else module.padding
            a = unfold(x, module.kernel_size, module.dilation, padding, module.stride)
            a = a.transpose(1, 2)  # (B, L, C*kh*kw)
            d = d.reshape(b, d.shape[1], -1).transpose(1, 2)  # (B, L, out)
        else:
            a = x.reshape(b, -1, x.shape[-1])
            d = d.reshape(b, -1, d.shape[-1])
        if module.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        return a, d
    if kind == EMBEDDING:
        ids = x.reshape(b, -1)
        d = d.reshape(b, ids.shape[1], -1)
        if module.padding_idx is not None:
            d = d.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0.0)
        return ids, d
    if kind == BATCHNORM:
        channels = x.shape[1]
        view = (1, channels) + (1,) * (x.dim() - 2)
        xhat = (x - module.running_mean.reshape(view)) / torch.sqrt(
            module.running_var.reshape(view) + module.eps
        )
        xhat = xhat.reshape(b, channels, -1).transpose(1, 2)  # (B, positions, C)
        return xhat, d.reshape(b, channels, -1).transpose(1, 2)
    # LayerNorm
    shape = tuple(module.normalized_shape)
    xhat = F.layer_norm(x, shape, None, None, module.eps)
    width = int(torch.Size(shape).numel())
    return xhat.reshape(b, -1, width), d.reshape(b, -1, width)


def _fallback_grads(cap: LayerCapture) -> Tensor:
    """``torch.func`` per-sample gradients of the module's own parameters, summed over its uses.

    Positional tensor inputs are per sample (batch leading); keyword arguments are
    not recorded and the module is called without them. Only the tensor outputs
    take part (a ``None`` in an output tuple is skipped).
    """
    module = cap.module
    names = param_names(module)
    params = {n: getattr(module, n).detach() for n in names}

    def one(x_args: Tuple[Tensor, ...], cot: Tuple[Tensor, ...]) -> Tensor:
        def f(p: Dict[str, Tensor]) -> Tuple[Tensor, ...]:
            args = x_args if cap.sample_inputs else tuple(x.unsqueeze(0) for x in x_args)
            out = functional_call(module, p, args)
            outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
            return tuple(o for o in outs if isinstance(o, Tensor))

        _, pull = vjp(f, params)
        (g,) = pull(cot if cap.sample_inputs else tuple(c.unsqueeze(0) for c in cot))
        return torch.cat([g[n].reshape(-1) for n in names])

    total: Optional[Tensor] = None
    for inputs, grads in zip(cap.inputs, cap.outgrads):
        g = vmap(one)(tuple(inputs), tuple(grads))
        total = g if total is None else total + g
    assert total is not None
    return total


class _Capture:
    """Forward hooks keeping the chosen modules' inputs and, through tensor hooks, their output gradients.

    Tensor hooks receive the gradient with respect to the output as the module
    returned it, even when a later in-place operation (``ReLU(inplace=True)``)
    modifies that tensor.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        self.captures = {n: LayerCapture(n, modules[n], layer_kind(modules[n]) or FALLBACK) for n in names}
        self._outputs_meta: Dict[str, List[List[Optional[Tensor]]]] = {n: [] for n in names}
        self._handles: List = []

    def __enter__(self) -> "_Capture":
        for cap in self.captures.values():
            self._handles.append(cap.module.register_forward_hook(self._hook(cap)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, cap: LayerCapture) -> Callable:
        def hook(module: nn.Module, inputs: Tuple, output: object) -> None:  # noqa: ARG001
            tensors = tuple(x.detach() for x in inputs if isinstance(x, Tensor))
            if not tensors:
                msg = f"layer {cap.name!r} was called without a tensor input"
                raise ConfigError(msg)
            outs = tuple(output) if isinstance(output, (tuple, list)) else (output,)
            outs = tuple(o for o in outs if isinstance(o, Tensor))
            use = len(cap.inputs)
            cap.inputs.append(tensors)
            cap.outgrads.append([None] * len(outs))
            # shape and dtype (no storage) of each output, for those that get no gradient
            self._outputs_meta[cap.name].append([torch.empty_like(o, device="meta") for o in outs])
            for k, out in enumerate(outs):
                if out.requires_grad:

                    def keep(grad: Tensor, use: int = use, k: int = k) -> None:
                        cap.outgrads[use][k] = grad.detach()

                    out.register_hook(keep)

        return hook

    def fill_missing(self) -> None:
        """Zero gradients for outputs the loss does not depend on."""
        for name, cap in self.captures.items():
            for use, grads in enumerate(cap.outgrads):
                for k, g in enumerate(grads):
                    if g is None:
                        meta = self._outputs_meta[name][use][k]
                        device = cap.inputs[use][0].device
                        grads[k] = torch.zeros(meta.shape, dtype=meta.dtype, device=device)


def default_layers(model: nn.Module) -> List[str]:
    """Every module that owns trainable parameters, in registration order."""
    return [n for n, m in model.named_modules() if layer_kind(m) is not None]


def _check_layers(model: nn.Module, names: Sequence[str]) -> None:
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        msg = (
            f"layers {unknown} are not modules of the model; modules with parameters: {default_layers(model)}"
        )
        raise ConfigError(msg)
    without = [n for n in names if layer_kind(modules[n]) is None]
    if without:
        msg = (
            f"layers {without} own no trainable parameters; modules with parameters: {default_layers(model)}"
        )
        raise ConfigError(msg)
    for n, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            msg = (
                f"module {n!r} is a BatchNorm in training mode: it mixes the samples of a batch, so "
                "per-sample gradients are undefined; call model.eval() first"
            )
            raise ConfigError(msg)
    owner: Dict[int, str] = {}
    for n in names:
        for p in modules[n].parameters(recurse=False):
            if id(p) in owner:
                msg = f"layers {owner[id(p)]!r} and {n!r} share a parameter (tied weights): record only one"
                raise ConfigError(msg)
            owner[id(p)] = n


def capture(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, object], Tensor],
    batch: object,
    layers: Optional[Sequence[str]] = None,
    reduction: str = "none",
) -> Dict[str, LayerCapture]:
    """One forward and backward pass recording every chosen layer's inputs and output gradients.

    ``loss_fn(model, batch)`` returns the per-sample losses ``(B,)`` (``reduction="none"``),
    their sum (``"sum"``) or their mean (``"mean"``, multiplied by ``B`` here). ``layers``
    names modules that own trainable parameters (default: all of them). The backward
    pass differentiates with respect to the recorded layers' parameters through
    ``torch.autograd.grad``, so the model's ``.grad`` fields are left untouched.
    Returns the captures in the order of ``layers``.
    """
    if reduction not in REDUCTIONS:
        msg = f"reduction must be one of {REDUCTIONS}, got {reduction!r}"
        raise ConfigError(msg)
    names = list(layers) if layers is not None else default_layers(model)
    _check_layers(model, names)
    with _Capture(model, names) as rec:
        loss = loss_fn(model, batch)
    if reduction == "none" and loss.dim() != 1:
        msg = (
            f"with reduction='none' loss_fn must return per-sample losses (B,), got shape {tuple(loss.shape)}"
        )
        raise ConfigError(msg)
    if reduction != "none" and loss.dim() != 0:
        msg = f"with reduction={reduction!r} loss_fn must return a scalar, got shape {tuple(loss.shape)}"
        raise ConfigError(msg)
    missing = [n for n, c in rec.captures.items() if not c.inputs]
    if missing:
        msg = f"layers {missing} were not called by the loss function"
        raise ConfigError(msg)
    caps = list(rec.captures.values())
    batch_size = caps[0].batch_size if caps else 0
    for c in caps:
        if any(x[0].shape[0] != batch_size for x in c.inputs):
            msg = f"layer {c.name!r} saw an input whose leading dimension is not the batch size {batch_size}"
            raise ConfigError(msg)
    total = loss.sum() if reduction == "none" else loss
    if reduction == "mean":
        total = total * batch_size
    params = [p for c in caps for p in c.module.parameters(recurse=False) if p.requires_grad]
    if params and total.requires_grad:
        torch.autograd.grad(total, params, allow_unused=True)
    rec.fill_missing()
    return rec.captures


def capture_batches(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, object], Tensor],
    batches: Iterable[object],
    layers: Optional[Sequence[str]] = None,
    reduction: str = "none",
) -> Iterable[Dict[str, LayerCapture]]:
    """:func:`capture` for each batch of a stream (one forward and backward pass each)."""
    for batch in batches:
        yield capture(model, loss_fn, batch, layers, reduction)


# -- inner products from the factors --------------------------------------------------


def _factored_cost(a: Tensor, d: Tensor, b2: int, t2: int) -> Tuple[float, float]:
    """Multiply-adds of the factored and the materialised inner products for one layer."""
    b1, t1, k_in = a.shape
    return _factored_cost_from(b1, t1, k_in, d.shape[-1], b2, t2)


def _factored_cost_from(b1: int, t1: int, k_in: int, k_out: int, b2: int, t2: int) -> Tuple[float, float]:
    """:func:`_factored_cost` from the sizes alone."""
    factored = float(b1) * b2 * t1 * t2 * (k_in + k_out)
    materialised = float(b1 * t1 + b2 * t2) * k_in * k_out + float(b1) * b2 * k_in * k_out
    return factored, materialised


def layer_inner_products(
    left: LayerCapture,
    right: LayerCapture,
    method: str = "auto",
    chunk: int = 16,
    right_cache: Optional[Dict[str, Tensor]] = None,
) -> Tensor:
    """``(B_1, B_2)`` inner products of one layer's per-sample gradients of two sample sets.

    ``method``: ``"factored"`` computes ``sum_{t,s} (a_it . a_js)(d_it . d_js)`` without
    forming any gradient, in chunks of ``chunk`` left samples (working memory
    ``chunk * B_2 * T * S``); ``"materialised"`` forms the layer's per-sample
    gradients of both sets; ``"auto"`` picks the one with fewer multiply-adds.
    LayerNorm, BatchNorm and fallback layers are always materialised (their gradients are no
    larger than their inputs or use ``torch.func``).

    ``right_cache`` (a dict owned by the caller, keyed by layer name) keeps the right
    side's materialised gradients for reuse when the same right capture (a test batch)
    meets many left ones; it grows to ``B_2 x P_layer`` per materialised layer, so pass
    it only when that fits.
    """
    if method not in ("auto", "factored", "materialised"):
        msg = f"method must be auto, factored or materialised, got {method!r}"
        raise ConfigError(msg)
    if left.kind != right.kind or left.module is not right.module:
        msg = f"layers {left.name!r} and {right.name!r} differ: inner products need the same layer"
        raise ValueError(msg)

    def right_grads() -> Tensor:
        if right_cache is None:
            return right.per_sample_grads()
        if right.name not in right_cache:
            right_cache[right.name] = right.per_sample_grads()
        return right_cache[right.name]

    if left.kind in (LAYERNORM, BATCHNORM, FALLBACK):
        return left.per_sample_grads() @ right_grads().T
    if method == "auto" and left.kind == LINEAR:  # decided from the shapes, before any unfolding
        b1, t1, k_in, k_out = left.factor_shape()
        b2, t2, _, _ = right.factor_shape()
        factored, materialised = _factored_cost_from(b1, t1, k_in, k_out, b2, t2)
        method = "factored" if factored <= materialised else "materialised"
    if method == "materialised":
        return left.per_sample_grads() @ right_grads().T
    a1, d1 = left.factors()
    if right_cache is None:
        a2, d2 = right.factors()
    else:  # a fixed right side: its factors (unfolded patches) are formed once
        key = f"{right.name}/factors"
        if key not in right_cache:
            right_cache[key] = right.factors()
        a2, d2 = right_cache[key]
    rows = []
    for start in range(0, a1.shape[0], max(1, chunk)):
        ac, dc = a1[start : start + chunk], d1[start : start + chunk]
        dd = torch.einsum("itk,jsk->ijts", dc, d2)
        if left.kind == EMBEDDING:
            aa = (ac[:, None, :, None] == a2[None, :, None, :]).to(dd.dtype)
        else:
            aa = torch.einsum("itk,jsk->ijts", ac, a2)
        rows.append((aa * dd).sum(dim=(2, 3)))
    out = torch.cat(rows, dim=0)
    if left.offset is None and right.offset is None:
        return out
    # <G_i + c, H_j + c'> = <G_i, H_j> + <G_i, c'> + <c, H_j> + <c, c'>
    if right.offset is not None:
        out = out + dot_with(left, right.offset, with_offset=False)[:, None]
    if left.offset is not None:
        out = out + dot_with(right, left.offset, with_offset=False)[None, :]
    if left.offset is not None and right.offset is not None:
        out = out + (left.offset.to(out.dtype) @ right.offset.to(out.dtype))
    return out


def as_layer_matrix(cap: LayerCapture, vec: Tensor) -> Tensor:
    """A flat ``(P_layer,)`` vector of a factored layer as its ``(out, in[+1])`` (embedding: ``(rows, dim)``) matrix."""
    weight = cap.module.weight
    if cap.kind == EMBEDDING:
        return vec.reshape(weight.shape)
    out_dim = int(weight.shape[0])
    w = vec[: weight.numel()].reshape(out_dim, -1)
    if cap.has_bias:
        w = torch.cat([w, vec[weight.numel() :].reshape(out_dim, 1)], dim=1)
    return w


def dot_with(cap: LayerCapture, vec: Tensor, with_offset: bool = True) -> Tensor:
    """``(B,)``: each sample's layer gradient dotted with the flat vector ``vec`` (``(P_layer,)``)."""
    if cap.kind in (LINEAR, EMBEDDING):
        a, d = cap.factors()
        mat = as_layer_matrix(cap, vec.to(d.dtype))
        out = (
            (mat[a] * d).sum(dim=(1, 2))
            if cap.kind == EMBEDDING
            else torch.einsum("bto,oi,bti->b", d, mat, a)
        )
    else:
        out = cap._grads_without_offset() @ vec.to(cap.inputs[0][0].dtype)
    if with_offset and cap.offset is not None:
        out = out + cap.offset.to(out.dtype) @ vec.to(out.dtype)
    return out


def layer_sq_norms(cap: LayerCapture) -> Tensor:
    """``(B,)``: each sample's squared gradient norm for one layer (offset included)."""
    if cap.kind == LINEAR:
        a, d = cap.factors()
        b, t, k_in = a.shape
        k_out = d.shape[-1]
        if float(t) * t * (k_in + k_out) <= float(t) * k_in * k_out + k_in * k_out:
            aa = torch.einsum("btk,bsk->bts", a, a)
            dd = torch.einsum("btk,bsk->bts", d, d)
            out = (aa * dd).sum(dim=(1, 2))
        else:
            out = cap._grads_without_offset().square().sum(dim=1)
    else:
        out = cap._grads_without_offset().square().sum(dim=1)
    if cap.offset is not None:
        c = cap.offset.to(out.dtype)
        out = out + 2 * dot_with(cap, c, with_offset=False) + c @ c
    return out


def sq_norms(caps: Dict[str, LayerCapture]) -> Tensor:
    """``(B,)``: squared norms of the whole per-sample gradients (the layers' squared norms summed)."""
    total: Optional[Tensor] = None
    for cap in caps.values():
        value = layer_sq_norms(cap)
        total = value if total is None else total + value
    assert total is not None
    return total


def inner_products(
    left: Dict[str, LayerCapture],
    right: Dict[str, LayerCapture],
    method: str = "auto",
    per_layer: bool = False,
    right_cache: Optional[Dict[str, Tensor]] = None,
) -> Union[Tensor, Dict[str, Tensor]]:
    """Per-sample gradient inner products summed over layers (``(B_1, B_2)``), or per layer (a dict).

    ``right_cache``: see :func:`layer_inner_products` (reuse of a fixed right side).
    """
    if list(left) != list(right):
        msg = f"the two captures cover different layers: {list(left)} vs {list(right)}"
        raise ValueError(msg)
    out: Dict[str, Tensor] = {}
    for name in left:
        out[name] = layer_inner_products(left[name], right[name], method, right_cache=right_cache)
    if per_layer:
        return out
    total = torch.zeros(())
    for value in out.values():
        total = value if total.dim() == 0 else total + value
    return total


# -- per-sample loss functions (dattri's convention) -----------------------------------


class LayerBackendUnsupported(ConfigError):
    """The model or the loss function cannot be captured layer by layer exactly."""


def module_param_names(model: nn.Module, layers: Sequence[str]) -> Dict[str, List[str]]:
    """``{layer: [full parameter names]}`` (``layer.weight``, ...), in the module's registration order."""
    modules = dict(model.named_modules())
    return {n: [f"{n}.{p}" if n else p for p in param_names(modules[n])] for n in layers}


def check_layer_support(
    model: nn.Module, selected: Optional[Sequence[str]] = None, allow_fallback: bool = True
) -> List[str]:
    """The layers that cover the ``selected`` trainable parameters (all when None), or LayerBackendUnsupported.

    Refused: a BatchNorm in training mode, a parameter shared by two modules (tied
    weights), a selection that covers only part of a module's parameters, and (unless
    ``allow_fallback``) modules without a factored form.
    """
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    wanted = list(trainable) if selected is None else list(selected)
    seen: Dict[int, str] = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            msg = f"module {n!r} is a BatchNorm in training mode (samples interact); call model.eval()"
            raise LayerBackendUnsupported(msg)
        for p in m.parameters(recurse=False):
            if id(p) in seen and seen[id(p)] != n:
                msg = f"modules {seen[id(p)]!r} and {n!r} share a parameter (tied weights)"
                raise LayerBackendUnsupported(msg)
            seen[id(p)] = n
    layers = [n for n in default_layers(model)]
    owned = module_param_names(model, layers)
    chosen = [n for n in layers if any(p in wanted for p in owned[n])]
    partial = [n for n in chosen if not all(p in wanted for p in owned[n])]
    if partial:
        msg = f"layer_name selects only some parameters of modules {partial}"
        raise LayerBackendUnsupported(msg)
    modules = dict(model.named_modules())
    if not allow_fallback:
        other = [n for n in chosen if layer_kind(modules[n]) == FALLBACK]
        if other:
            kinds = sorted({type(modules[n]).__name__ for n in other})
            msg = f"modules {other[:3]} ({', '.join(kinds)}) have no factored per-sample gradient"
            raise LayerBackendUnsupported(msg)
    return chosen


def _tensor_outputs(output: object) -> Tuple[List[Tensor], Callable[[List[Tensor]], object]]:
    """A module output's tensors and a function rebuilding the output from replacements."""
    if isinstance(output, Tensor):
        return [output], lambda new: new[0]
    if isinstance(output, (tuple, list)):
        idx = [i for i, o in enumerate(output) if isinstance(o, Tensor)]

        def rebuild(new: List[Tensor]) -> object:
            items = list(output)
            for i, t in zip(idx, new):
                items[i] = t
            return type(output)(items)

        return [output[i] for i in idx], rebuild
    msg = f"a module returned {type(output).__name__}; only tensors and tuples of tensors are supported"
    raise LayerBackendUnsupported(msg)


class PerSampleLayers:
    """Per-layer per-sample gradients of a per-sample loss ``func(params, sample)`` (dattri's convention).

    ``func`` sees one sample without a batch dimension (and usually calls the model on
    it as a batch of one, through ``torch.func.functional_call``); it is ``vmap``-ed over
    the batch, so the modules run one batched forward and backward pass, and forward
    hooks on the model's modules do what :func:`capture` does for a batched loss:

    * a zero perturbation ``eps`` is added to every recorded layer output and the
      gradient of the sample's loss with respect to ``eps`` is that sample's output
      gradient ``d_i`` (no parameter gradient is formed);
    * the layer inputs ``a_i`` are returned as auxiliary outputs of the vmapped function.

    The loss may also depend on the parameters directly (an L2 penalty inside
    ``func``): :meth:`direct_gradient` finds that part with every recorded layer output
    detached, refuses it when it differs between samples, and the captures carry it as
    a constant ``offset`` of each layer's per-sample gradient. The result is the exact
    gradient of ``func`` per sample, as ``vmap(grad(func))`` gives it.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        """Record the modules named in ``layers`` (see :func:`check_layer_support`)."""
        self.model = model
        self.layers = list(layers)
        modules = dict(model.named_modules())
        self.modules = {n: modules[n] for n in self.layers}
        self.kinds = {n: layer_kind(m) or FALLBACK for n, m in self.modules.items()}
        self.param_names = module_param_names(model, self.layers)
        self._state: Optional[Dict[str, object]] = None
        self._shapes: Dict[Tuple, Tuple[Dict, Dict, Callable]] = {}

    # -- hooks ---------------------------------------------------------------------------
    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: Tuple, output: object) -> object:  # noqa: ARG001
            state = self._state
            if state is None:
                return None
            outs, rebuild = _tensor_outputs(output)
            uses = state["uses"]
            use = uses.get(name, 0)
            uses[name] = use + 1
            if state["mode"] == "probe":
                state["shapes"].setdefault(name, []).append([(o.shape, o.dtype) for o in outs])
                state["in_dims"].setdefault(name, []).append(
                    [x.dim() for x in inputs if isinstance(x, Tensor)]
                )
                return rebuild([o.detach() for o in outs])
            tensors = tuple(x.detach() for x in inputs if isinstance(x, Tensor))
            state["inputs"].setdefault(name, []).append(tensors)
            eps = state["eps"][name][use]
            return rebuild([o + e for o, e in zip(outs, eps)])

        return hook

    def _run(self, state: Dict[str, object], call: Callable[[], object]) -> object:
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        self._state = state
        try:
            return call()
        finally:
            self._state = None
            for h in handles:
                h.remove()

    def _probe(self, func: Callable, params: Dict[str, Tensor], sample: object) -> Tuple[Dict, Dict, Dict]:
        """One sample with every recorded output detached: ``(direct gradient, output shapes, input dims)``."""
        state: Dict[str, object] = {"mode": "probe", "uses": {}, "shapes": {}, "in_dims": {}}
        direct = self._run(state, lambda: torch.func.grad(func)(params, sample))
        missing = [n for n in self.layers if n not in state["shapes"]]
        if missing:
            msg = f"modules {missing[:3]} were not called by the loss function (does it call the model?)"
            raise LayerBackendUnsupported(msg)
        return direct, state["shapes"], state["in_dims"]

    def direct_gradient(
        self, func: Callable, params: Dict[str, Tensor], samples: Sequence[object]
    ) -> Optional[Dict[str, Tensor]]:
        """``{layer: (P_layer,)}``: the gradient of ``func`` outside the layers' forward passes, or None if zero.

        Computed on each of ``samples`` (one sample each, no batch dimension); refused
        (LayerBackendUnsupported) when it differs between them: only a term that is the
        same for every sample (a penalty on the parameters) can be carried as an offset.
        """
        first: Optional[Dict[str, Tensor]] = None
        for sample in samples:
            direct, _, _ = self._probe(func, params, sample)
            if first is None:
                first = direct
            elif any(not torch.equal(first[k], direct[k]) for k in first):
                msg = "the loss depends on the parameters outside the modules' forward passes, per sample"
                raise LayerBackendUnsupported(msg)
        if first is None or all(not bool(v.any()) for v in first.values()):
            return None
        out = {}
        for n in self.layers:
            parts = [first[p].reshape(-1) for p in self.param_names[n] if p in first]
            out[n] = torch.cat(parts).detach()
        return out

    def capture(
        self,
        func: Callable,
        params: Dict[str, Tensor],
        batch: object,
        direct: Optional[Dict[str, Tensor]] = None,
    ) -> Dict[str, LayerCapture]:
        """One vmapped forward and backward pass over ``batch``: the captures of the recorded layers.

        ``params`` are the parameters ``func`` is called with (not differentiated);
        ``direct`` the offsets from :meth:`direct_gradient`.
        """
        from dattri_cli.func.batch import batch_size_of, index_batch, tensor_leaves  # noqa: PLC0415

        size = batch_size_of(batch)
        # the layers' per-sample output shapes, probed on one sample per new sample shape
        key = (id(func), tuple((tuple(t.shape[1:]), t.dtype) for t in tensor_leaves(batch)))
        if key not in self._shapes:
            first = index_batch(batch, 0)
            state: Dict[str, object] = {"mode": "probe", "uses": {}, "shapes": {}, "in_dims": {}}
            with torch.no_grad():
                self._run(state, lambda: func(params, first))
            self._shapes = {key: (state["shapes"], state["in_dims"], func)}  # func held: its id stays unique
        shapes, in_dims, _ = self._shapes[key]
        missing = [n for n in self.layers if n not in shapes]
        if missing:
            msg = f"modules {missing[:3]} were not called by the loss function (does it call the model?)"
            raise LayerBackendUnsupported(msg)
        eps = {
            n: [
                [torch.zeros((size, *shape), dtype=dtype, device=_device_of(batch)) for shape, dtype in use]
                for use in shapes[n]
            ]
            for n in self.layers
        }

        def one(eps_: Dict[str, List[List[Tensor]]], sample: object) -> Tuple[Tensor, Dict]:
            inner: Dict[str, object] = {"mode": "capture", "uses": {}, "inputs": {}, "eps": eps_}
            loss = self._run(inner, lambda: func(params, sample))
            return loss, inner["inputs"]

        grads, inputs = vmap(torch.func.grad(one, has_aux=True), in_dims=(0, 0), randomness="different")(
            eps, batch
        )
        caps: Dict[str, LayerCapture] = {}
        for n in self.layers:
            module, kind = self.modules[n], self.kinds[n]
            cap = LayerCapture(n, module, kind, offset=None if direct is None else direct.get(n))
            groups = set()
            for use, (xs, ds) in enumerate(zip(inputs[n], grads[n])):
                if kind == FALLBACK:
                    cap.sample_inputs = True
                    cap.inputs.append(tuple(xs))
                    cap.outgrads.append(list(ds))
                    continue
                x, d = xs[0], ds[0]
                per_sample_dim = in_dims[n][use][0]
                if _needs_merge(module, per_sample_dim):
                    groups.add(int(x.shape[1]))
                    x = x.reshape(-1, *x.shape[2:])
                    d = d.reshape(-1, *d.shape[2:])
                else:
                    groups.add(1)
                cap.inputs.append((x,))
                cap.outgrads.append([d])
            if len(groups) > 1:
                msg = f"module {n!r} is called on batches of different sizes within one sample"
                raise LayerBackendUnsupported(msg)
            cap.group = groups.pop() if groups else 1
            caps[n] = cap
        return caps


def _device_of(batch: object) -> torch.device:
    from dattri_cli.func.batch import tensor_leaves  # noqa: PLC0415

    return tensor_leaves(batch)[0].device


def _needs_merge(module: nn.Module, per_sample_dim: int) -> bool:
    """Whether a module's per-sample input ``(m, ...)`` is a batch of ``m`` rows to merge into the samples' rows.

    Linear, Embedding and LayerNorm treat leading dimensions as positions already; a
    convolution or BatchNorm needs ``(rows, channels, ...)``.
    """
    if isinstance(module, nn.Conv2d):
        return per_sample_dim == 4  # 3: an unbatched (C, H, W) sample
    return isinstance(module, nn.modules.batchnorm._BatchNorm)
