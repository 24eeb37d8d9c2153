"""K-FAC and EK-FAC: Kronecker-factored curvature for ``nn.Linear`` and ``nn.Conv2d``.

For one layer with weight ``W`` (``out x in``; a bias is a last column of
ones in the input, so the layer matrix is ``out x (in + 1)``), the per-sample
gradient is ``G = sum_l ds_l a_l^T`` over the layer's locations ``l`` (one for
a dense input, the output pixels for a convolution): ``a_l`` is the input
(an unfolded patch for a convolution) and ``ds_l`` the gradient with respect
to the pre-activation (the layer's output). The curvature of the mean training
loss restricted to the layer is approximated by

* K-FAC: ``S (x) A`` with ``A = 1/n sum_i 1/L sum_l a a^T`` and
  ``S = 1/n sum_i sum_l ds ds^T`` (location sum for ``S``, mean for ``A``,
  as in KFC for convolutions);
* EK-FAC: the same eigenbasis ``Q_S (x) Q_A``, with the eigenvalues replaced by
  the second moments of the per-sample gradients in that basis,
  ``Lambda = 1/n sum_i (Q_S^T G_i Q_A)^2`` (elementwise), which is the diagonal
  that minimises the Frobenius distance to the curvature in that basis.

The curvature is one of two matrices (``fisher``):

* ``"gauss_newton"`` (default): the generalised Gauss-Newton matrix
  ``1/n sum_i J_i^T H_i J_i``, where ``H_i`` is the Hessian of sample i's loss
  with respect to the model output. It is built exactly: ``H_i = L_i L_i^T``
  and every column of ``L_i`` is back-propagated as a pseudo-gradient (C
  backward passes for C outputs). For cross-entropy this equals the true
  Fisher, i.e. the expectation of what sampling labels from the model gives,
  without the sampling noise.

  With many outputs per sample (a language model: positions x vocabulary) the
  ``C`` backward passes are many; ``num_output_samples=k`` replaces them by ``k``
  random combinations ``u = R_i eps / sqrt(k)`` of the columns of the root
  ``R_i`` (``eps`` Rademacher, seeded), whose outer products average to
  ``H_i`` (an unbiased Monte Carlo estimate, like Kronfluence's sampled
  pseudo-labels). When the output Hessian is block diagonal over the positions
  (a loss that adds up per-position terms, checked with one random Hessian-vector
  product) the blocks take ``V`` passes and the root is computed per position, so
  no ``C x C`` matrix is formed.
* ``"empirical"``: the empirical Fisher ``1/n sum_i g_i g_i^T`` with the true
  labels (one backward pass; what the public dattri library estimates).

Supported layers: ``nn.Linear``, ``nn.Conv2d`` (``groups=1``, zero padding) and
Hugging Face's ``Conv1D`` (GPT-2: ``y = x W + b`` with ``W`` stored ``in x out``,
detected by class name and shape, transformers is never imported); a layer whose
weight is tied to a parameter registered under another name (GPT-2's ``lm_head``,
tied to the token embedding) is left out, since the flat parameter vector holds
that tensor once, under its first name. The layer outputs' gradients are taken by
tensor hooks registered on each output in the forward pass, so a later in-place
operation (``nn.ReLU(inplace=True)``, as torchvision's ResNets use) does not change
them. A model may return a tensor, a Hugging Face ``ModelOutput`` or a tuple: the
logits are taken from it.

Only terms of the loss that depend on the parameters *through the model output*
enter the factors: a weight-decay term added inside ``loss_func`` contributes
to the gradients but not to these matrices (use ``damping`` for it).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from dattri_cli import distributed
from dattri_cli.errors import ConfigError, NumericalError
from dattri_cli.func.batch import batch_size_of, to_device
from dattri_cli.func.layer_grads import unfold_patches
from dattri_cli.func.linalg import robust_eigh
from dattri_cli.models.hf import unwrap_logits

FISHER_CHOICES = ("gauss_newton", "empirical")
SUPPORTED_TYPES = (nn.Linear, nn.Conv2d)
SUPPORTED_NAMES = "nn.Linear, nn.Conv2d, transformers' Conv1D"
#: outputs per sample above which the exact Gauss-Newton factors suggest num_output_samples
MANY_OUTPUTS = 512


# -- which layers ------------------------------------------------------------------


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D`` (GPT-2): ``y = x W + b``, ``W`` of shape ``(in, out)``.

    Judged by class name and shapes, so transformers is never imported.
    """
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and isinstance(nf, int)
        and weight.shape[1] == nf
    )


def is_supported_type(module: nn.Module) -> bool:
    """A layer kind K-FAC factors (before the finer checks of :func:`unsupported_reason`)."""
    return isinstance(module, SUPPORTED_TYPES) or is_hf_conv1d(module)


def out_features(module: nn.Module) -> int:
    """The number of output features (rows of the layer matrix)."""
    return int(module.weight.shape[1] if is_hf_conv1d(module) else module.weight.shape[0])


def _canonical_names(model: nn.Module) -> Dict[int, str]:
    """Each parameter tensor's first registered name (the one ``model.named_parameters()`` keeps)."""
    return {id(p): name for name, p in model.named_parameters()}


def _weight_owners(model: nn.Module) -> Dict[int, List[str]]:
    """For each parameter tensor, every module that registers it (more than one: tied weights)."""
    owners: Dict[int, List[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for _, param in module.named_parameters(recurse=False, remove_duplicate=False):
            if mod_name not in owners.setdefault(id(param), []):
                owners[id(param)].append(mod_name)
    return owners


def _tied_to(
    model: nn.Module,
    name: str,
    canonical: Optional[Dict[int, str]] = None,
    owners: Optional[Dict[int, List[str]]] = None,
) -> Optional[str]:
    """What module ``name``'s weight is tied to, or None when no other module uses it.

    A tied copy (GPT-2's ``lm_head``) names the weight's first registered name; the
    first owner names the other modules, whose uses K-FAC's factors of this layer
    alone would miss.
    """
    canonical = _canonical_names(model) if canonical is None else canonical
    owners = _weight_owners(model) if owners is None else owners
    module = model.get_submodule(name)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return None
    own = f"{name}.weight" if name else "weight"
    first = canonical.get(id(weight))
    if first is not None and first != own:
        return first
    others = [m for m in owners.get(id(weight), []) if m != name]
    return f"the weight of module {others[0]!r} as well" if others else None


def unsupported_reason(module: nn.Module, tied_to: Optional[str] = None) -> Optional[str]:
    """Why K-FAC here cannot handle ``module`` (None when it can).

    ``tied_to`` names the parameter the module's weight is tied to, if any.
    """
    if not is_supported_type(module):
        return f"{type(module).__name__} is not a supported layer type ({SUPPORTED_NAMES})"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
        if isinstance(module.padding, str) and module.padding != "valid":
            return f"Conv2d with padding={module.padding!r} (use explicit integer padding)"
    if tied_to is not None:
        return f"its weight is tied to {tied_to} (K-FAC would see only this layer's use of it)"
    if not module.weight.requires_grad:
        return "its weight is frozen (requires_grad=False)"
    if module.bias is not None and not module.bias.requires_grad:
        return "its bias is frozen while the weight is trained"
    return None


def layer_param_names(model: nn.Module, name: str) -> List[str]:
    """The parameter names of module ``name`` in flat-vector order: weight, then bias."""
    module = model.get_submodule(name)
    prefix = f"{name}." if name else ""
    names = [prefix + "weight"]
    if module.bias is not None:
        names.append(prefix + "bias")
    return names


@dataclass
class LayerSelection:
    """The modules K-FAC covers and the trainable parameters it leaves out."""

    modules: List[str]
    param_names: List[str]
    excluded: Dict[str, str] = field(default_factory=dict)  # parameter name -> reason


def select_layers(model: nn.Module, module_name: Optional[Sequence[str]] = None) -> LayerSelection:
    """Choose the layers: all supported ones (None) or exactly those named.

    Explicitly named modules that do not exist or are not supported are an error
    naming them. With ``module_name=None`` every trainable parameter outside a
    supported layer is listed in ``excluded`` (the caller warns about them).
    Parameters are named as ``model.named_parameters()`` names them (a tied
    weight once, under its first name).
    """
    modules = dict(model.named_modules())
    canonical, owners = _canonical_names(model), _weight_owners(model)

    def reason(name: str) -> Optional[str]:
        mod = modules[name]
        tied = _tied_to(model, name, canonical, owners) if is_supported_type(mod) else None
        return unsupported_reason(mod, tied)

    if module_name is not None:
        names = [module_name] if isinstance(module_name, str) else list(module_name)
        unknown = [n for n in names if n not in modules]
        if unknown:
            candidates = [n for n in modules if reason(n) is None]
            msg = f"module_name {unknown} not among the model's modules; supported layers are {candidates}"
            raise ConfigError(msg)
        bad = {n: reason(n) for n in names}
        bad = {n: r for n, r in bad.items() if r is not None}
        if bad:
            detail = "; ".join(f"{n!r}: {r}" for n, r in bad.items())
            msg = f"module_name names layers EK-FAC cannot handle ({detail}); choose other layers in module_name"
            raise ConfigError(msg)
        if len(set(names)) != len(names):
            msg = f"module_name lists a layer twice: {names}"
            raise ConfigError(msg)
    else:
        names = [n for n in modules if reason(n) is None]
    covered = {p for n in names for p in layer_param_names(model, n)}
    excluded: Dict[str, str] = {}
    for full, p in model.named_parameters():
        if p.requires_grad and full not in covered:
            owner = full.rsplit(".", 1)[0] if "." in full else ""
            excluded[full] = reason(owner) or "layer not selected in module_name"
    if not names:
        msg = (
            f"EK-FAC found no supported layer ({SUPPORTED_NAMES} with trainable weight) in the model"
            f"; trainable parameters: {sorted(excluded)}"
        )
        raise ConfigError(msg)
    params = [p for n in names for p in layer_param_names(model, n)]
    return LayerSelection(names, params, excluded)


def warn_excluded(selection: LayerSelection, method: str = "EK-FAC") -> None:
    """One warning listing every trainable parameter left out, grouped by the reason."""
    if selection.excluded:
        by_reason: Dict[str, List[str]] = {}
        for param, reason in selection.excluded.items():
            by_reason.setdefault(reason, []).append(param)
        listing = "; ".join(f"{', '.join(params)} ({reason})" for reason, params in by_reason.items())
        warnings.warn(
            f"{method} leaves these trainable parameters out of the attribution (their gradients are "
            f"ignored on both sides): {listing}. Pass module_name to choose the layers explicitly.",
            stacklevel=3,
        )


# -- layer inputs and output gradients, per location ------------------------------


def layer_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """``(n, L, in[+1])``: the input of every location, with a 1 appended for a bias."""
    # a convolution's patches: (n, L, in * kh * kw), channel-major like weight.reshape(out, -1)
    a = unfold_patches(module, x) if isinstance(module, nn.Conv2d) else x.reshape(x.shape[0], -1, x.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    return a


def layer_outgrads(module: nn.Module, grad_out: Tensor) -> Tensor:
    """``(n, L, out)``: the gradient with respect to the layer output at every location."""
    if isinstance(module, nn.Conv2d):
        return grad_out.reshape(grad_out.shape[0], grad_out.shape[1], -1).transpose(1, 2)
    return grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1])


def to_matrix(flat: Tensor, out_features: int, has_bias: bool, transposed: bool = False) -> Tensor:
    """Rows of a layer's flat gradient (weight row-major, then bias) as ``(k, out, in[+1])``.

    ``transposed``: the weight is stored ``(in, out)`` (Hugging Face's ``Conv1D``).
    """
    k = flat.shape[0]
    w, b = (flat[:, :-out_features], flat[:, -out_features:]) if has_bias else (flat, None)
    w = w.reshape(k, -1, out_features).transpose(1, 2) if transposed else w.reshape(k, out_features, -1)
    if b is not None:
        return torch.cat([w, b.reshape(k, out_features, 1)], dim=2)
    return w


def from_matrix(mat: Tensor, has_bias: bool, transposed: bool = False) -> Tensor:
    """Inverse of :func:`to_matrix`: ``(k, out, in[+1]) -> (k, P_layer)``."""
    k = mat.shape[0]
    w = mat[:, :, :-1] if has_bias else mat
    w = w.transpose(1, 2).reshape(k, -1) if transposed else w.reshape(k, -1)
    if has_bias:
        return torch.cat([w, mat[:, :, -1]], dim=1)
    return w


class _Recorder:
    """Forward hooks keeping each selected layer's input, its weight as used, and the model output.

    The gradient with respect to a layer's output is caught by a tensor hook
    registered on that output in the forward pass: it fires with the gradient of
    the output as the layer returned it, even when a later in-place operation
    (``ReLU(inplace=True)``) overwrote the tensor. Each backward pass asks for the
    gradients of the recorded weights (the tensors the forward pass used, also
    under ``functional_call``), which makes autograd run through every layer output.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model, self.names = model, list(names)
        self.inputs: Dict[str, Tensor] = {}
        self.weights: Dict[str, Tensor] = {}
        self.out_meta: Dict[str, Tensor] = {}
        self.grads: Dict[str, Tensor] = {}
        self.model_output: Optional[Tensor] = None
        self._handles: List = []

    def __enter__(self) -> "_Recorder":
        for name in self.names:
            self._handles.append(self.model.get_submodule(name).register_forward_hook(self._layer_hook(name)))
        self._handles.append(self.model.register_forward_hook(self._model_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _layer_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: Tuple, output: Tensor) -> None:
            if name in self.inputs:
                msg = (
                    f"layer {name!r} ran twice in one loss evaluation (shared weights); EK-FAC cannot "
                    "factor it: leave it out with module_name"
                )
                raise ConfigError(msg)
            self.inputs[name] = inputs[0].detach()
            self.weights[name] = module.weight
            self.out_meta[name] = torch.empty_like(output, device="meta")
            if output.requires_grad:
                # a weak reference: the hook lives in the autograd graph, and a strong one would close
                # graph -> hook -> recorder -> model_output -> graph, a cycle Python's collector cannot
                # see through autograd's C++ nodes (every batch's activations leaked: BERT EK-FAC
                # grew by ~0.4 GiB per batch)
                recorder = weakref.ref(self)

                def keep(grad: Tensor) -> None:
                    owner = recorder()
                    if owner is not None:
                        owner.grads[name] = grad.detach()

                output.register_hook(keep)

        return hook

    def _model_hook(self, module: nn.Module, inputs: Tuple, output: Any) -> None:  # noqa: ARG002
        if self.model_output is not None:
            msg = "the loss function called the model twice on one batch; EK-FAC needs one forward pass per batch"
            raise ConfigError(msg)
        try:
            self.model_output = unwrap_logits(output)
        except TypeError as exc:
            msg = f"EK-FAC needs the model's logits: {exc}"
            raise ConfigError(msg) from exc

    def backward(self, target: Tensor, grad_outputs: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """The layer output gradients of one backward pass of ``target`` (zeros where it does not depend)."""
        self.grads = {}
        weights = [self.weights[n] for n in self.names]
        live = [w for w in weights if w.requires_grad]
        if live and target.requires_grad:
            torch.autograd.grad(target, live, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True)
        out = {}
        for name in self.names:
            grad = self.grads.get(name)
            if grad is None:
                meta = self.out_meta[name]
                grad = torch.zeros(meta.shape, dtype=meta.dtype, device=self.inputs[name].device)
            out[name] = grad
        self.grads = {}
        return out


def _output_hessian(loss: Tensor, z: Tensor) -> Tensor:
    """``(n, C, C)``: the Hessian of sample i's loss in its own output ``z_i`` (``loss`` is their sum)."""
    n = z.shape[0]
    (gz,) = torch.autograd.grad(loss, z, create_graph=True)
    gz = gz.reshape(n, -1)
    rows = []
    for c in range(gz.shape[1]):
        if gz.requires_grad:
            (h,) = torch.autograd.grad(gz[:, c].sum(), z, retain_graph=True, allow_unused=True)
        else:
            h = None
        rows.append(torch.zeros_like(z).reshape(n, -1) if h is None else h.reshape(n, -1))
    return torch.stack(rows, dim=1)


def _psd_roots(hess: Tensor) -> Tensor:
    """Batched ``R`` with ``R R^T`` the symmetrised matrices of ``hess`` (negative eigenvalues clipped).

    The batched ``eigh`` is tried first (same bits as always); if it fails or returns
    non-finite values, each finite matrix goes through :func:`robust_eigh` (float64,
    jitter ladder). A matrix holding NaN/Inf gives NaN roots, so the factor it feeds is
    refused with the layer's name (:func:`fit_factors`).
    """
    hess = 0.5 * (hess + hess.transpose(-1, -2))
    try:
        evals, evecs = torch.linalg.eigh(hess)
        ok = bool(torch.isfinite(evals).all() and torch.isfinite(evecs).all())
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        ok = False
    if not ok:
        size = hess.shape[-1]
        what = "the Hessian of a sample's loss in the model output"
        nan = torch.full((size,), float("nan"), dtype=hess.dtype, device=hess.device)
        pairs = [
            robust_eigh(m, what) if bool(torch.isfinite(m).all()) else (nan, nan.expand(size, size))
            for m in hess.reshape(-1, size, size)
        ]
        evals = torch.stack([e for e, _ in pairs]).reshape(hess.shape[:-1])
        evecs = torch.stack([v for _, v in pairs]).reshape(hess.shape)
    return evecs * evals.clamp_min(0.0).sqrt()[..., None, :]


def _output_hessian_blocks(loss: Tensor, z: Tensor) -> Optional[Tensor]:
    """``(n, T, V, V)`` per-position blocks of the output Hessians, or None when they are not block diagonal.

    ``z`` is ``(n, T..., V)``. For a loss that adds up per-position terms (a language
    model's token losses) the Hessian has no terms between positions, and ``V``
    double-backward passes (probe ``e_c`` at every position at once) give every block,
    instead of ``T * V`` passes and a ``(T V)^2`` matrix. Whether the loss is of that
    kind is checked with one Hessian-vector product along a random direction,
    compared with what the blocks give.
    """
    if z.dim() < 3:
        return None
    n, v = z.shape[0], z.shape[-1]
    t = z[0].numel() // v
    if t < 2:
        return None
    (gz,) = torch.autograd.grad(loss, z, create_graph=True)
    if not gz.requires_grad:
        return None
    g = gz.reshape(n, t, v)
    blocks = z.new_zeros(n, t, v, v)
    for c in range(v):
        (h,) = torch.autograd.grad(g[:, :, c].sum(), z, retain_graph=True, allow_unused=True)
        if h is not None:
            blocks[:, :, c, :] = h.reshape(n, t, v)
    probe = torch.randn(n, t, v, generator=torch.Generator().manual_seed(0)).to(z)
    (true,) = torch.autograd.grad((g * probe).sum(), z, retain_graph=True, allow_unused=True)
    true = torch.zeros_like(probe) if true is None else true.reshape(n, t, v)
    approx = torch.einsum("ntcv,ntv->ntc", blocks, probe)
    scale = float(true.abs().max()) if true.numel() else 0.0
    tol = 100 * torch.finfo(z.dtype).eps * max(scale, 1e-30) * v
    if float((true - approx).abs().max()) > tol:
        return None
    return blocks


def _pseudo_outputs(
    loss: Tensor, z: Tensor, num_output_samples: Optional[int], generator: Optional[torch.Generator]
) -> Iterable[Tensor]:
    """Vectors ``u`` shaped like ``z`` whose outer products (summed) give the output Hessians ``H_i``.

    Exact (``num_output_samples=None``): the columns of ``R_i``. Sampled: ``k``
    vectors ``R_i eps / sqrt(k)`` with Rademacher ``eps``; block-diagonal Hessians
    (per position) use the per-position roots and independent signs per position.
    """
    n = z.shape[0]
    blocks = _output_hessian_blocks(loss, z) if num_output_samples is not None else None
    if blocks is None:
        roots = _psd_roots(_output_hessian(loss, z))  # (n, C, C)
        if num_output_samples is None:
            if roots.shape[2] > MANY_OUTPUTS:
                warnings.warn(
                    f"EK-FAC's exact Gauss-Newton factors back-propagate each of the {roots.shape[2]} model "
                    "outputs per sample; set num_output_samples (e.g. 1-8) to sample pseudo-gradients instead",
                    stacklevel=2,
                )
            for k in range(roots.shape[2]):
                yield roots[:, :, k].reshape(z.shape)
            return
        for _ in range(num_output_samples):
            eps = _rademacher((n, roots.shape[2]), generator).to(roots)
            yield (torch.einsum("ncj,nj->nc", roots, eps) / num_output_samples**0.5).reshape(z.shape)
        return
    roots = _psd_roots(blocks)  # (n, T, V, V)
    for _ in range(num_output_samples):
        eps = _rademacher(roots.shape[:3], generator).to(roots)
        yield (torch.einsum("ntvj,ntj->ntv", roots, eps) / num_output_samples**0.5).reshape(z.shape)


def _rademacher(shape: Tuple[int, ...], generator: Optional[torch.Generator]) -> Tensor:
    return torch.randint(0, 2, tuple(shape), generator=generator, dtype=torch.int64) * 2.0 - 1.0


def layer_statistics(
    loss_func: Callable,
    params: Dict[str, Tensor],
    batch: Tuple[Tensor, ...],
    model: nn.Module,
    names: Sequence[str],
    fisher: str = "gauss_newton",
    num_output_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Dict[str, Tensor], Iterator[Dict[str, Tensor]]]:
    """Per layer the inputs ``(n, L, in[+1])``, and the pseudo-gradients ``(n, L, out)`` one pass at a time.

    The curvature contribution of sample i is ``sum_k G_ik G_ik^T`` with
    ``G_ik = sum_l ds_ikl a_il^T``; ``k`` runs over the output-Hessian roots
    (Gauss-Newton; ``num_output_samples`` random combinations of them) or is the
    single true-label gradient (empirical Fisher). The pseudo-gradients are
    yielded pass by pass (a dict per ``k``), so memory holds one of them at a time.
    """
    if fisher not in FISHER_CHOICES:
        msg = f"fisher must be one of {', '.join(FISHER_CHOICES)}, got {fisher!r}"
        raise ConfigError(msg)
    n = batch_size_of(batch)
    live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    rec = _Recorder(model, names)
    with rec:
        loss = loss_func(live, batch) * n  # the sum of the per-sample losses
    missing = [nm for nm in names if nm not in rec.inputs]
    if missing:
        msg = f"layers {missing} were not used by the loss function; leave them out with module_name"
        raise ConfigError(msg)
    modules = {nm: model.get_submodule(nm) for nm in names}
    inputs = {nm: layer_inputs(modules[nm], rec.inputs[nm]).detach() for nm in names}
    if fisher == "gauss_newton":
        z = rec.model_output
        if z is None or z.shape[0] != n:
            msg = "the Gauss-Newton factors need the model output with a leading batch dimension; use fisher=empirical"
            raise ConfigError(msg)

    def passes() -> Iterator[Dict[str, Tensor]]:
        if fisher == "empirical":
            vectors: Iterable[Optional[Tensor]] = [None]
        else:
            vectors = _pseudo_outputs(loss, z, num_output_samples, generator)
        for vec in vectors:
            if vec is not None and not bool(vec.any()):
                continue
            grads = rec.backward(loss if vec is None else z, vec)
            yield {nm: layer_outgrads(modules[nm], grads[nm]).detach() for nm in names}

    return inputs, passes()


# -- fitting -------------------------------------------------------------------------


@dataclass
class LayerFactors:
    """K-FAC factors of one layer, their eigendecompositions and the EK-FAC eigenvalues."""

    name: str
    out_features: int
    has_bias: bool
    a_cov: Tensor  # (in[+1], in[+1])
    s_cov: Tensor  # (out, out)
    a_evals: Optional[Tensor] = None
    a_evecs: Optional[Tensor] = None  # columns are eigenvectors
    s_evals: Optional[Tensor] = None
    s_evecs: Optional[Tensor] = None
    corrected: Optional[Tensor] = None  # (out, in[+1]) second moments in the eigenbasis
    transposed: bool = False  # weight stored (in, out): Hugging Face's Conv1D

    def eigenvalues(self, corrected: bool = True) -> Tensor:
        """``(out, in[+1])`` eigenvalues: corrected (EK-FAC) or ``s_j * a_k`` (K-FAC)."""
        if corrected:
            if self.corrected is None:
                msg = f"layer {self.name}: the eigenvalue correction was not fitted"
                raise ValueError(msg)
            return self.corrected
        return torch.outer(self.s_evals.clamp_min(0.0), self.a_evals.clamp_min(0.0))

    def dense(self, corrected: bool = True) -> Tensor:
        """The approximate curvature as a dense matrix in the layer's flat layout (tests, small layers)."""
        basis = torch.kron(self.s_evecs, self.a_evecs)  # row-major vec of (out, in[+1])
        mat = basis @ torch.diag(self.eigenvalues(corrected).reshape(-1)) @ basis.T
        size = mat.shape[0]
        index = torch.arange(size).reshape(1, self.out_features, -1)
        perm = from_matrix(index, self.has_bias, self.transposed)[0]
        return mat[perm][:, perm]

    def inverse_apply(self, flat: Tensor, damping: float, corrected: bool = True) -> Tensor:
        """Rows ``(C + damping I)^-1 v`` of a ``(k, P_layer)`` block, through the eigenbasis."""
        v = to_matrix(flat, self.out_features, self.has_bias, self.transposed).to(self.s_evecs.dtype)
        rotated = self.s_evecs.T @ v @ self.a_evecs
        rotated = rotated / (self.eigenvalues(corrected) + damping)
        solved = self.s_evecs @ rotated @ self.a_evecs.T
        return from_matrix(solved, self.has_bias, self.transposed).to(flat.dtype)


_FACTOR_FIELDS = ("a_cov", "s_cov", "a_evals", "a_evecs", "s_evals", "s_evecs", "corrected")


def factors_to_blocks(factors: Dict[str, LayerFactors], count: int) -> Dict[str, Tensor]:
    """Named tensors holding every fitted factor (for the on-disk train-side cache)."""
    blocks = {"num_samples": torch.tensor([count], dtype=torch.int64)}
    for name, f in factors.items():
        for field_name in _FACTOR_FIELDS:
            value = getattr(f, field_name)
            if value is not None:
                blocks[f"{name}--{field_name}"] = value
    return blocks


def factor_block_names(names: Sequence[str], corrected: bool) -> List[str]:
    """The block names :func:`factors_to_blocks` writes for these layers."""
    fields = [f for f in _FACTOR_FIELDS if corrected or f != "corrected"]
    return ["num_samples"] + [f"{name}--{f}" for name in names for f in fields]


def bias_of(model: nn.Module, names: Sequence[str]) -> Dict[str, bool]:
    """Whether each named layer has a bias."""
    modules = dict(model.named_modules())
    return {name: getattr(modules[name], "bias", None) is not None for name in names}


def transposed_of(model: nn.Module, names: Sequence[str]) -> Dict[str, bool]:
    """Whether each named layer stores its weight ``(in, out)`` (Hugging Face's ``Conv1D``)."""
    modules = dict(model.named_modules())
    return {name: is_hf_conv1d(modules[name]) for name in names}


def factors_from_blocks(
    blocks: Dict[str, Tensor],
    names: Sequence[str],
    has_bias: Dict[str, bool],
    transposed: Optional[Dict[str, bool]] = None,
) -> Tuple[Dict[str, LayerFactors], int]:
    """Inverse of :func:`factors_to_blocks`."""
    factors = {}
    transposed = transposed or {}
    for name in names:
        fields = {k: blocks.get(f"{name}--{k}") for k in _FACTOR_FIELDS}
        factors[name] = LayerFactors(
            name,
            int(fields["s_cov"].shape[0]),
            has_bias[name],
            **fields,
            transposed=transposed.get(name, False),
        )
    return factors, int(blocks["num_samples"][0])


def _batches(loader: Iterable, device: str) -> Iterable[Tuple[Tensor, ...]]:
    for batch in loader:
        yield to_device(batch, device)


def check_num_output_samples(num_output_samples: Optional[int]) -> None:
    """Refuse anything but None or a positive integer."""
    ok = num_output_samples is None or (
        isinstance(num_output_samples, int)
        and not isinstance(num_output_samples, bool)
        and num_output_samples > 0
    )
    if not ok:
        msg = f"num_output_samples must be null (exact) or a positive integer, got {num_output_samples!r}"
        raise ConfigError(msg)


def fit_factors(
    loss_func: Callable,
    params: Dict[str, Tensor],
    loader: Iterable,
    model: nn.Module,
    names: Sequence[str],
    fisher: str = "gauss_newton",
    correct: bool = True,
    device: str = "cpu",
    dtype: torch.dtype = torch.float64,
    progress: Callable[[Iterable, str], Iterable] = lambda it, _desc: it,
    num_output_samples: Optional[int] = None,
    seed: int = 0,
    fast_correction: bool = False,
) -> Tuple[Dict[str, LayerFactors], int]:
    """Fit ``A``, ``S``, their eigenbases and (``correct``) the EK-FAC eigenvalues over ``loader``.

    Two passes over the data: the factors, then the second moments in their
    eigenbasis. Accumulation is in ``dtype`` (float64 by default). Returns the
    factors per layer name and the number of samples seen. ``num_output_samples``
    (Gauss-Newton only) samples that many pseudo-gradients per sample instead of
    one per model output, from a generator seeded with ``seed``. ``fast_correction``: the
    second moments through :func:`eigen_moments`' GEMM forms (the same values, summed in
    another order, so other last bits; for large models).
    """
    check_num_output_samples(num_output_samples)
    generator = torch.Generator().manual_seed(int(seed)) if num_output_samples is not None else None
    modules = {nm: model.get_submodule(nm) for nm in names}
    factors: Dict[str, LayerFactors] = {}
    # per-batch sums folded in global batch order: the same bits under torchrun
    sums: Dict[str, Tuple[distributed.OrderedSum, distributed.OrderedSum]] = {}
    count = 0
    for batch in progress(_batches(loader, device), "K-FAC factors"):
        inputs, passes = layer_statistics(
            loss_func, params, batch, model, names, fisher, num_output_samples, generator
        )
        s_sums: Dict[str, Any] = {nm: 0 for nm in names}
        for grads in passes:  # one pseudo-gradient at a time, folded like sum() over a list
            for nm in names:
                g = grads[nm].to(dtype)
                s_sums[nm] = s_sums[nm] + torch.einsum("nli,nlj->ij", g, g)
        for nm in names:
            a = inputs[nm].to(dtype)
            a_sum = torch.einsum("nli,nlj->ij", a, a) / a.shape[1]
            s_sum = s_sums[nm]
            if not isinstance(s_sum, Tensor):  # no pseudo-gradient (zero output Hessians)
                out = out_features(modules[nm])
                s_sum = torch.zeros(out, out, dtype=dtype, device=a.device)
            if nm not in factors:
                factors[nm] = LayerFactors(
                    nm,
                    out_features(modules[nm]),
                    modules[nm].bias is not None,
                    a_sum,
                    s_sum,
                    transposed=is_hf_conv1d(modules[nm]),
                )
                sums[nm] = (distributed.OrderedSum(), distributed.OrderedSum())
            sums[nm][0].add(a_sum)
            sums[nm][1].add(s_sum)
        count += batch_size_of(batch)
    # under torchrun each rank saw its own training rows: sum the factors over ranks
    count = distributed.reduce_count(count, device)
    if count == 0:
        msg = "K-FAC saw no training samples (empty loader)"
        raise ConfigError(msg)
    for f in factors.values():
        f.a_cov = sums[f.name][0].result() / count
        f.s_cov = sums[f.name][1].result() / count
        # plain eigh first (same bits); float64, zero rows split off and jitter only if it fails
        f.a_evals, f.a_evecs = robust_eigh(f.a_cov, f"K-FAC activation factor A of layer {f.name}")
        f.s_evals, f.s_evecs = robust_eigh(f.s_cov, f"K-FAC output-gradient factor S of layer {f.name}")
        if not (torch.isfinite(f.a_evals).all() and torch.isfinite(f.s_evals).all()):
            msg = f"K-FAC factors of layer {f.name} are not finite: check the data and the checkpoint"
            raise NumericalError(msg)
    if correct:
        moments = {nm: distributed.OrderedSum() for nm in factors}
        for batch in progress(_batches(loader, device), "EK-FAC eigenvalue correction"):
            inputs, passes = layer_statistics(
                loss_func, params, batch, model, names, fisher, num_output_samples, generator
            )
            a_rot = {nm: inputs[nm].to(dtype) @ factors[nm].a_evecs for nm in names}  # (n, L, in)
            batch_moments = {
                nm: torch.zeros_like(factors[nm].s_cov[:, :1] * factors[nm].a_cov[:1, :]) for nm in names
            }
            for grads in passes:
                for nm in names:
                    g_rot = grads[nm].to(dtype) @ factors[nm].s_evecs  # (n, L, out)
                    batch_moments[nm] += eigen_moments(g_rot, a_rot[nm], fast_correction)
            for nm in names:
                moments[nm].add(batch_moments[nm])
        for f in factors.values():
            moment = moments[f.name].result()
            moment = moment if moment is not None else torch.zeros_like(f.eigenvalues(False))
            f.corrected = moment / count
    return factors, count


#: at most this many positions per sample: the second moments come from position pairs in one GEMM
PAIR_POSITIONS = 8


def eigen_moments(g_rot: Tensor, a_rot: Tensor, fast: bool = False) -> Tensor:
    """``sum_n (sum_l g_nl a_nl^T)^2`` (elementwise square): EK-FAC's second moments of one batch, ``(out, in)``.

    ``g_rot`` ``(n, L, out)`` and ``a_rot`` ``(n, L, in)`` are the rotated output gradients and
    inputs. Plain: every sample's ``out x in`` matrix is formed, squared and summed (memory
    traffic of ``n * out * in`` values, several times). ``fast``: with few positions the
    square expands over position pairs, ``sum_{l<=m} c_lm (g_l * g_m)(a_l * a_m)^T``
    (``c`` = 1 on the diagonal, 2 off it), one GEMM with ``n L (L + 1) / 2`` inner rows
    (for ``L = 1``: ``(g^2)^T a^2``); with many, the per-sample matrices are formed in chunks
    of bounded size and squared in place. Same value, other summation order.
    """
    if not fast:
        return torch.einsum("nlo,nli->noi", g_rot, a_rot).square().sum(dim=0)
    n, positions, k_out = g_rot.shape
    k_in = a_rot.shape[-1]
    if positions <= PAIR_POSITIONS:
        first, second = torch.triu_indices(positions, positions, device=g_rot.device)
        weight = torch.where(first == second, 1.0, 2.0).to(g_rot.dtype)
        gg = g_rot[:, first] * g_rot[:, second] * weight[:, None]  # (n, pairs, out)
        aa = a_rot[:, first] * a_rot[:, second]  # (n, pairs, in)
        return gg.reshape(-1, k_out).T @ aa.reshape(-1, k_in)
    out = g_rot.new_zeros(k_out, k_in)
    rows = max(1, EIGENBASIS_CHUNK_ELEMENTS // max(1, k_out * k_in))
    for start in range(0, n, rows):
        g = torch.einsum("nlo,nli->noi", g_rot[start : start + rows], a_rot[start : start + rows])
        out += g.square_().sum(dim=0)
    return out


def auto_damping(eigenvalues: Tensor, ratio: float) -> float:
    """``ratio`` times the mean eigenvalue of the layer (the default when damping is None)."""
    return float(ratio * eigenvalues.clamp_min(0.0).mean())


def check_invertible(name: str, eigenvalues: Tensor, damping: float) -> None:
    """Refuse a (nearly) singular damped curvature with the fix, instead of returning Inf/NaN."""
    damped = eigenvalues + damping
    scale = float(eigenvalues.abs().max()) if eigenvalues.numel() else 0.0
    floor = torch.finfo(eigenvalues.dtype).eps * max(scale, 1e-30) * eigenvalues.numel()
    if damping < 0 or float(damped.min()) <= floor:
        zeros = int((damped <= floor).sum())
        msg = (
            f"layer {name}: the damped curvature is singular ({zeros} of {eigenvalues.numel()} eigenvalues "
            f"+ damping {damping:g} are <= {floor:.2g}); set damping to a positive value, or damping=null "
            "for the automatic default"
        )
        raise NumericalError(msg)


# -- scores in the eigenbasis (per-layer captures, no flat gradient) ---------------------

#: elements of one chunk of rotated per-sample gradients ``(rows, out, in[+1])`` (128 MiB in float32)
EIGENBASIS_CHUNK_ELEMENTS = 1 << 25


class EigenbasisLayer:
    """One layer's influence scores in its K-FAC eigenbasis, from per-position factors ``(a, d)``.

    With eigenbases ``Q_S``, ``Q_A`` and eigenvalues ``E`` (``out x in[+1]``, corrected or
    Kronecker products), a sample's layer gradient ``G = sum_l d_l a_l^T`` is seen as
    ``G~ = Q_S^T G Q_A``; since ``(C + damping I)^-1`` is diagonal there,

    ``g_i^T (C + damping I)^-1 g_j = <G~_i, G~_j / (E + damping)>``

    and nothing is rotated back. ``G~`` is formed from the rotated factors
    (``Q_S^T d_l``, ``Q_A^T a_l``: ``L (in^2 + out^2) + L out in`` per sample) or, when the
    positions are many, by rotating the formed gradient (``L out in + out in (out + in)``),
    whichever costs fewer multiply-adds. ``a`` is ``(B, L, in[+1])`` with the bias column
    last (:func:`layer_inputs`' convention), ``d`` is ``(B, L, out)``; ``offset`` is a flat
    ``(P_layer,)`` term added to every sample's gradient (a penalty inside the loss).
    Train-side work is in ``dtype`` (the captures'), the test side in the factors' dtype
    and then cast, like :meth:`LayerFactors.inverse_apply`'s float64 solve.

    Columns of the test side that are exactly zero for every test sample add nothing to any
    score, so :meth:`live_columns` drops them and the training side is rotated onto the
    remaining columns only (``cols``). On ResNet-18 at 32x32 inputs the last convolutions
    see 1x1 maps: 8 of 9 taps of every patch are padding, their activation-factor rows are
    zero, the eigenvectors there are unit vectors (:func:`~dattri_cli.func.linalg.robust_eigh`
    splits them off) and about 89% of those layers' columns go.
    """

    def __init__(self, factors: LayerFactors, damping: float, corrected: bool, dtype: torch.dtype) -> None:
        """Keep the eigenbases in ``dtype`` and ``1 / (E + damping)`` for one layer."""
        if factors.transposed:
            msg = f"layer {factors.name}: weights stored (in, out) have no eigenbasis scoring; use the flat path"
            raise ValueError(msg)
        self.factors, self.dtype = factors, dtype
        self.inverse = 1.0 / (factors.eigenvalues(corrected) + damping)  # factors' dtype
        self._bases: Dict[torch.dtype, Tuple[Tensor, Tensor]] = {}

    def _basis(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        if dtype not in self._bases:
            self._bases[dtype] = (self.factors.s_evecs.to(dtype), self.factors.a_evecs.to(dtype))
        return self._bases[dtype]

    def _offset(self, offset: Optional[Tensor], qs: Tensor, qa: Tensor) -> Optional[Tensor]:
        if offset is None:
            return None
        f = self.factors
        mat = to_matrix(offset.reshape(1, -1).to(qs.dtype), f.out_features, f.has_bias)[0]
        return qs.T @ mat @ qa

    def rotated(
        self,
        a: Tensor,
        d: Tensor,
        offset: Optional[Tensor] = None,
        dtype: Optional[torch.dtype] = None,
        cols: Optional[Tensor] = None,
    ) -> Iterator[Tuple[int, Tensor]]:
        """``(start, G~[start:start+k])`` chunks of the samples' gradients in the eigenbasis, ``(k, out, in[+1])``.

        ``cols`` (indices) keeps only those columns of ``G~``. Chunks hold at most
        :data:`EIGENBASIS_CHUNK_ELEMENTS` values.
        """
        dtype = dtype or self.dtype
        qs, qa = self._basis(dtype)
        a, d = a.to(dtype), d.to(dtype)
        b, positions, k_in = a.shape
        k_out = d.shape[-1]
        if (k_in, k_out) != (qa.shape[0], qs.shape[0]):
            msg = (
                f"layer {self.factors.name}: captured factors are {k_in} x {k_out} wide, the K-FAC factors "
                f"{qa.shape[0]} x {qs.shape[0]}"
            )
            raise ValueError(msg)
        if cols is not None:
            qa = qa[:, cols]
        k_cols = qa.shape[1]
        # multiply-adds per sample: rotate every position, then the outer products; or form G, then rotate it
        factors_first = positions * (k_in * k_cols + k_out * k_out + k_out * k_cols) <= (
            positions * k_out * k_in + k_out * k_out * k_in + k_out * k_in * k_cols
        )
        if factors_first:  # rotate every position once, for the whole batch
            a, d = a @ qa, d @ qs
        shift = self._offset(offset, qs, qa)
        rows = max(1, EIGENBASIS_CHUNK_ELEMENTS // max(1, k_in * k_out))
        for start in range(0, b, rows):
            g = torch.einsum("blo,bli->boi", d[start : start + rows], a[start : start + rows])
            if not factors_first:
                g = qs.T @ g @ qa
            if shift is not None:
                g = g + shift
            yield start, g

    def test_side(self, a: Tensor, d: Tensor, offset: Optional[Tensor] = None) -> Tensor:
        """``(B, out, in[+1])``: ``G~_j / (E + damping)`` of the test samples, in ``dtype``."""
        work = self.inverse.dtype
        parts = [(g * self.inverse).to(self.dtype) for _, g in self.rotated(a, d, offset, dtype=work)]
        return torch.cat(parts)

    @staticmethod
    def live_columns(test: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """``(test side without its all-zero columns, the kept column indices or None when all are kept)``."""
        live = test.ne(0).flatten(0, 1).any(dim=0)
        if bool(live.all()):
            return test, None
        cols = live.nonzero().flatten()
        return test[:, :, cols].contiguous(), cols

    @staticmethod
    def merge_columns(parts: Sequence[Tuple[Tensor, Optional[Tensor]]]) -> Tuple[Tensor, Optional[Tensor]]:
        """Batches of :meth:`live_columns` joined on the union of their kept columns (zeros where a batch had none)."""
        if len(parts) == 1:
            return parts[0]
        width = None
        if any(cols is None for _, cols in parts):
            width = max(t.shape[2] for t, cols in parts if cols is None)
            union = None
        else:
            union = torch.unique(torch.cat([cols for _, cols in parts]))  # sorted
        out = []
        for t, cols in parts:
            size = width if union is None else union.numel()
            if cols is None and union is None:
                out.append(t)
                continue
            full = t.new_zeros(t.shape[0], t.shape[1], size)
            index = cols if union is None else torch.searchsorted(union, cols)
            full[:, :, index] = t
            out.append(full)
        return torch.cat(out), union

    def scores(
        self,
        a: Tensor,
        d: Tensor,
        test: Tensor,
        offset: Optional[Tensor] = None,
        cols: Optional[Tensor] = None,
    ) -> Tensor:
        """``(B_1, B_2)``: the training samples' layer influence on the test side of :meth:`test_side`.

        ``cols``: the test side's kept columns (:meth:`live_columns`).
        """
        flat_test = test.reshape(test.shape[0], -1)
        out = flat_test.new_zeros(a.shape[0], test.shape[0])
        for start, g in self.rotated(a, d, offset, cols=cols):
            out[start : start + g.shape[0]] = g.reshape(g.shape[0], -1) @ flat_test.T
        return out

    def self_terms(
        self,
        a: Tensor,
        d: Tensor,
        offset: Optional[Tensor],
        target: Optional[Tuple[Tensor, Tensor, Optional[Tensor]]],
    ) -> Tuple[Optional[Tensor], Tensor]:
        """Per sample ``(g_target^T (C + dI)^-1 g, ||(C + dI)^-1 g||^2)`` of this layer (``target``: its factors).

        The first is None without ``target``. The norm needs no rotation back: the bases are orthonormal.
        """
        inverse = self.inverse.to(self.dtype)
        pairs = []
        rows_t = self.rotated(*target) if target is not None else None
        for _start, g in self.rotated(a, d, offset):
            solved = g * inverse
            norm = solved.square().sum(dim=(1, 2))
            dot = None
            if rows_t is not None:
                _, gt = next(rows_t)
                dot = (solved * gt).sum(dim=(1, 2))
            pairs.append((dot, norm))
        dots = None if target is None else torch.cat([p[0] for p in pairs])
        return dots, torch.cat([p[1] for p in pairs])
