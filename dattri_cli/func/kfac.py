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
* ``"empirical"``: the empirical Fisher ``1/n sum_i g_i g_i^T`` with the true
  labels (one backward pass; what the public dattri library estimates).

Only terms of the loss that depend on the parameters *through the model output*
enter the factors: a weight-decay term added inside ``loss_func`` contributes
to the gradients but not to these matrices (use ``damping`` for it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dattri_cli import distributed
from dattri_cli.errors import ConfigError, NumericalError
from dattri_cli.func.batch import batch_size_of, to_device
from dattri_cli.func.linalg import robust_eigh

FISHER_CHOICES = ("gauss_newton", "empirical")
SUPPORTED_TYPES = (nn.Linear, nn.Conv2d)


# -- which layers ------------------------------------------------------------------


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why K-FAC here cannot handle ``module`` (None when it can)."""
    if not isinstance(module, SUPPORTED_TYPES):
        return f"{type(module).__name__} is not a supported layer type (nn.Linear, nn.Conv2d)"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
        if isinstance(module.padding, str) and module.padding != "valid":
            return f"Conv2d with padding={module.padding!r} (use explicit integer padding)"
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
    """
    modules = dict(model.named_modules())
    if module_name is not None:
        names = [module_name] if isinstance(module_name, str) else list(module_name)
        unknown = [n for n in names if n not in modules]
        if unknown:
            candidates = [n for n, m in modules.items() if isinstance(m, SUPPORTED_TYPES)]
            msg = f"module_name {unknown} not among the model's modules; supported layers are {candidates}"
            raise ConfigError(msg)
        bad = {n: unsupported_reason(modules[n]) for n in names}
        bad = {n: r for n, r in bad.items() if r is not None}
        if bad:
            detail = "; ".join(f"{n!r}: {r}" for n, r in bad.items())
            msg = f"module_name names layers EK-FAC cannot handle ({detail}); choose other layers in module_name"
            raise ConfigError(msg)
        if len(set(names)) != len(names):
            msg = f"module_name lists a layer twice: {names}"
            raise ConfigError(msg)
    else:
        names = [
            n for n, m in modules.items() if isinstance(m, SUPPORTED_TYPES) and unsupported_reason(m) is None
        ]
    covered = {p for n in names for p in layer_param_names(model, n)}
    excluded: Dict[str, str] = {}
    for mod_name, module in modules.items():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p.requires_grad and full not in covered:
                excluded[full] = unsupported_reason(module) or "layer not selected in module_name"
    if not names:
        msg = (
            "EK-FAC found no supported layer (nn.Linear or nn.Conv2d with trainable weight) in the model"
            f"; trainable parameters: {sorted(excluded)}"
        )
        raise ConfigError(msg)
    params = [p for n in names for p in layer_param_names(model, n)]
    return LayerSelection(names, params, excluded)


def warn_excluded(selection: LayerSelection) -> None:
    """One warning listing every trainable parameter left out, with the reason."""
    if selection.excluded:
        listing = ", ".join(f"{k} ({v})" for k, v in selection.excluded.items())
        warnings.warn(
            f"EK-FAC leaves these trainable parameters out of the attribution (their gradients are "
            f"ignored on both sides): {listing}. Pass module_name to choose the layers explicitly.",
            stacklevel=3,
        )


# -- layer inputs and output gradients, per location ------------------------------


def layer_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """``(n, L, in[+1])``: the input of every location, with a 1 appended for a bias."""
    if isinstance(module, nn.Conv2d):
        padding = 0 if module.padding == "valid" else module.padding
        patches = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
        )
        a = patches.transpose(1, 2)  # (n, L, in * kh * kw), channel-major like weight.reshape(out, -1)
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    return a


def layer_outgrads(module: nn.Module, grad_out: Tensor) -> Tensor:
    """``(n, L, out)``: the gradient with respect to the layer output at every location."""
    if isinstance(module, nn.Conv2d):
        return grad_out.reshape(grad_out.shape[0], grad_out.shape[1], -1).transpose(1, 2)
    return grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1])


def to_matrix(flat: Tensor, out_features: int, has_bias: bool) -> Tensor:
    """Rows of a layer's flat gradient (weight row-major, then bias) as ``(k, out, in[+1])``."""
    k = flat.shape[0]
    if has_bias:
        w, b = flat[:, :-out_features], flat[:, -out_features:]
        return torch.cat([w.reshape(k, out_features, -1), b.reshape(k, out_features, 1)], dim=2)
    return flat.reshape(k, out_features, -1)


def from_matrix(mat: Tensor, has_bias: bool) -> Tensor:
    """Inverse of :func:`to_matrix`: ``(k, out, in[+1]) -> (k, P_layer)``."""
    k = mat.shape[0]
    if has_bias:
        return torch.cat([mat[:, :, :-1].reshape(k, -1), mat[:, :, -1]], dim=1)
    return mat.reshape(k, -1)


class _Recorder:
    """Forward hooks keeping each selected layer's input and (graph-attached) output."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model, self.names = model, list(names)
        self.records: Dict[str, Tuple[Tensor, Tensor]] = {}
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
        def hook(module: nn.Module, inputs: Tuple, output: Tensor) -> None:  # noqa: ARG001
            if name in self.records:
                msg = (
                    f"layer {name!r} ran twice in one loss evaluation (shared weights); EK-FAC cannot "
                    "factor it: leave it out with module_name"
                )
                raise ConfigError(msg)
            self.records[name] = (inputs[0].detach(), output)

        return hook

    def _model_hook(self, module: nn.Module, inputs: Tuple, output: Tensor) -> None:  # noqa: ARG002
        if self.model_output is not None:
            msg = "the loss function called the model twice on one batch; EK-FAC needs one forward pass per batch"
            raise ConfigError(msg)
        if not isinstance(output, Tensor):
            msg = f"EK-FAC needs the model to return one tensor, it returned {type(output).__name__}"
            raise ConfigError(msg)
        self.model_output = output


def _output_hessian_roots(loss: Tensor, z: Tensor) -> Tensor:
    """``(n, C, C)`` with ``R R^T`` the Hessian of sample i's loss in its own output ``z_i``.

    ``loss`` is the *sum* of per-sample losses, so the batch Hessian is block diagonal.
    """
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
    hess = torch.stack(rows, dim=1)
    hess = 0.5 * (hess + hess.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(hess)
    return evecs * evals.clamp_min(0.0).sqrt()[:, None, :]


def layer_statistics(
    loss_func: Callable,
    params: Dict[str, Tensor],
    batch: Tuple[Tensor, ...],
    model: nn.Module,
    names: Sequence[str],
    fisher: str = "gauss_newton",
) -> Dict[str, Tuple[Tensor, List[Tensor]]]:
    """Per layer: inputs ``(n, L, in[+1])`` and the pseudo-gradients ``[(n, L, out), ...]``.

    The curvature contribution of sample i is ``sum_k G_ik G_ik^T`` with
    ``G_ik = sum_l ds_ikl a_il^T``; ``k`` runs over the output-Hessian roots
    (Gauss-Newton) or is the single true-label gradient (empirical Fisher).
    """
    if fisher not in FISHER_CHOICES:
        msg = f"fisher must be one of {', '.join(FISHER_CHOICES)}, got {fisher!r}"
        raise ConfigError(msg)
    n = batch_size_of(batch)
    live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with _Recorder(model, names) as rec:
        loss = loss_func(live, batch) * n  # the sum of the per-sample losses
    missing = [nm for nm in names if nm not in rec.records]
    if missing:
        msg = f"layers {missing} were not used by the loss function; leave them out with module_name"
        raise ConfigError(msg)
    outs = [rec.records[nm][1] for nm in names]
    modules = [model.get_submodule(nm) for nm in names]
    if fisher == "empirical":
        grads = torch.autograd.grad(loss, outs, allow_unused=True)
        pseudo = [[g if g is not None else torch.zeros_like(o)] for g, o in zip(grads, outs)]
    else:
        z = rec.model_output
        if z is None or z.shape[0] != n:
            msg = "the Gauss-Newton factors need the model output with a leading batch dimension; use fisher=empirical"
            raise ConfigError(msg)
        roots = _output_hessian_roots(loss, z)
        pseudo = [[] for _ in names]
        for k in range(roots.shape[2]):
            vec = roots[:, :, k].reshape(z.shape)
            if not bool(vec.any()):
                continue
            grads = torch.autograd.grad(z, outs, grad_outputs=vec, retain_graph=True, allow_unused=True)
            for j, (g, o) in enumerate(zip(grads, outs)):
                pseudo[j].append(g if g is not None else torch.zeros_like(o))
    return {
        nm: (layer_inputs(mod, rec.records[nm][0]).detach(), [layer_outgrads(mod, g).detach() for g in gs])
        for nm, mod, gs in zip(names, modules, pseudo)
    }


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
        perm = from_matrix(torch.arange(size).reshape(1, self.out_features, -1), self.has_bias)[0]
        return mat[perm][:, perm]

    def inverse_apply(self, flat: Tensor, damping: float, corrected: bool = True) -> Tensor:
        """Rows ``(C + damping I)^-1 v`` of a ``(k, P_layer)`` block, through the eigenbasis."""
        v = to_matrix(flat, self.out_features, self.has_bias).to(self.s_evecs.dtype)
        rotated = self.s_evecs.T @ v @ self.a_evecs
        rotated = rotated / (self.eigenvalues(corrected) + damping)
        return from_matrix(self.s_evecs @ rotated @ self.a_evecs.T, self.has_bias).to(flat.dtype)


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


def factors_from_blocks(
    blocks: Dict[str, Tensor], names: Sequence[str], has_bias: Dict[str, bool]
) -> Tuple[Dict[str, LayerFactors], int]:
    """Inverse of :func:`factors_to_blocks`."""
    factors = {}
    for name in names:
        fields = {k: blocks.get(f"{name}--{k}") for k in _FACTOR_FIELDS}
        factors[name] = LayerFactors(name, int(fields["s_cov"].shape[0]), has_bias[name], **fields)
    return factors, int(blocks["num_samples"][0])


def _batches(loader: Iterable, device: str) -> Iterable[Tuple[Tensor, ...]]:
    for batch in loader:
        yield to_device(batch, device)


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
) -> Tuple[Dict[str, LayerFactors], int]:
    """Fit ``A``, ``S``, their eigenbases and (``correct``) the EK-FAC eigenvalues over ``loader``.

    Two passes over the data: the factors, then the second moments in their
    eigenbasis. Accumulation is in ``dtype`` (float64 by default). Returns the
    factors per layer name and the number of samples seen.
    """
    factors: Dict[str, LayerFactors] = {}
    # per-batch sums folded in global batch order: the same bits under torchrun
    sums: Dict[str, Tuple[distributed.OrderedSum, distributed.OrderedSum]] = {}
    count = 0
    for batch in progress(_batches(loader, device), "K-FAC factors"):
        stats = layer_statistics(loss_func, params, batch, model, names, fisher)
        for nm, (a, gs) in stats.items():
            a = a.to(dtype)
            a_sum = torch.einsum("nli,nlj->ij", a, a) / a.shape[1]
            s_sum = sum(torch.einsum("nli,nlj->ij", g.to(dtype), g.to(dtype)) for g in gs)
            if nm not in factors:
                out = gs[0].shape[-1] if gs else model.get_submodule(nm).weight.shape[0]
                factors[nm] = LayerFactors(nm, out, model.get_submodule(nm).bias is not None, a_sum, s_sum)
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
            stats = layer_statistics(loss_func, params, batch, model, names, fisher)
            for nm, (a, gs) in stats.items():
                f = factors[nm]
                a_rot = a.to(dtype) @ f.a_evecs  # (n, L, in)
                moment = torch.zeros_like(f.s_cov[:, :1] * f.a_cov[:1, :])
                for g in gs:
                    g_rot = g.to(dtype) @ f.s_evecs  # (n, L, out)
                    moment += torch.einsum("nlo,nli->noi", g_rot, a_rot).square().sum(dim=0)
                moments[nm].add(moment)
        for f in factors.values():
            moment = moments[f.name].result()
            moment = moment if moment is not None else torch.zeros_like(f.eigenvalues(False))
            f.corrected = moment / count
    return factors, count


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
