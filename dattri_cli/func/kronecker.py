"""Factored (Kronecker) random projection of per-layer per-sample gradients.

A linear layer's per-sample gradient is ``G = sum_t d_t a_t^T`` (``out x in``; ``t``
runs over positions, a 1 is appended to ``a`` for a bias). Projecting its row-major
vectorisation with the Kronecker product of two small Gaussian matrices,
``(P_out (x) P_in) vec(G) = vec(P_out G P_in^T)``, needs only the projected factors:

``P_out G P_in^T = sum_t (P_out d_t) (P_in a_t)^T``   (``k_out x k_in``)

so ``G`` is never formed (the idea of LoGra: Choe et al., 2024, "What is Your Data
Worth to GPT?"). For a convolution each position is projected and the positions
summed; for an embedding ``a_t`` is the one-hot token id, so ``P_in a_t`` is a column
of ``P_in``. ``P_in`` (``k_in x in``) and ``P_out`` (``k_out x out``) hold i.i.d.
``N(0, 1/k)`` entries, so ``E[P^T P] = I`` for each and for their Kronecker product,
and inner products of projected gradients equal those of the gradients in
expectation. Layers without a factored form (LayerNorm, fallback layers) have their
small per-sample gradient projected by one dense ``N(0, 1/k)`` matrix.

Dimension rule (:func:`kronecker_dims`): with ``proj_dim`` per layer,
``k_in = min(in, isqrt(proj_dim))`` and ``k_out = min(out, proj_dim // k_in)``, so a
layer contributes ``k_in * k_out <= proj_dim`` values; a side whose size is at most
its ``k`` is not projected (the identity: exact, and cheaper). The projected vector of
a model is the concatenation over layers in capture order.

Determinism: ``P_in`` and ``P_out`` depend only on ``(seed, ckpt_idx, layer name,
side)`` (generated on the CPU in float32 from a seeded generator, then moved to the
gradients' device and dtype, so every device uses the same matrices), and with
``deterministic=True`` each sample is copied to fresh memory and projected alone by
products of fixed shape, so its result does not depend on the batch size, on the
other samples of the batch or on its position in the batch, bit for bit (BLAS may
round a product differently for another shape or memory alignment).
"""

from __future__ import annotations

import hashlib
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dattri_cli.errors import ConfigError
from dattri_cli.func.layer_grads import EMBEDDING, LINEAR, LayerCapture, as_layer_matrix, unfold_patches


def kronecker_dims(in_dim: int, out_dim: int, proj_dim: int) -> Tuple[int, int]:
    """``(k_in, k_out)`` for a layer with ``in_dim`` inputs (bias column included) and ``out_dim`` outputs.

    Square-ish (``sqrt(proj_dim)`` a side) for wide layers; a side narrower than that is kept
    whole and the other side gets the rest, so ``k_in * k_out`` comes as close to ``proj_dim``
    as the layer allows (a 10 x 65 layer at 512: 51 x 10, not 22 x 10).
    """
    if proj_dim < 1:
        msg = f"proj_dim must be a positive integer, got {proj_dim}"
        raise ConfigError(msg)
    k_in = min(in_dim, math.isqrt(proj_dim))
    k_out = min(out_dim, proj_dim // k_in)
    k_in = min(in_dim, proj_dim // k_out)  # a narrow output side leaves room for more input dimensions
    return k_in, k_out


def matrix_seed(seed: int, ckpt_idx: int, layer: str, side: str) -> int:
    """A 63-bit generator seed from (seed, checkpoint, layer name, side)."""
    digest = hashlib.blake2b(f"kronecker/{seed}/{ckpt_idx}/{layer}/{side}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def gaussian_matrix(
    rows: int,
    cols: int,
    seed: int,
    ckpt_idx: int,
    layer: str,
    side: str,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> Optional[Tensor]:
    """``(rows, cols)`` with ``N(0, 1/rows)`` entries, or None (the identity) when ``rows >= cols``."""
    if rows >= cols:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(matrix_seed(seed, ckpt_idx, layer, side))
    mat = torch.randn(rows, cols, generator=gen, dtype=torch.float32) / math.sqrt(rows)
    return mat.to(device=device, dtype=dtype)


def _apply(mat: Optional[Tensor], x: Tensor) -> Tensor:
    """``x @ mat^T`` (rows of ``x`` projected), or ``x`` for the identity."""
    return x if mat is None else x @ mat.T


def layer_sizes(cap: LayerCapture) -> Tuple[int, ...]:
    """``(in[+1], out)`` of a factored layer (an embedding: ``(rows, dim)``), ``(P_layer,)`` otherwise."""
    if cap.kind == EMBEDDING:
        return int(cap.module.weight.shape[0]), int(cap.module.weight.shape[1])
    if cap.kind == LINEAR:
        weight = cap.module.weight
        return int(weight[0].numel()) + int(cap.has_bias), int(weight.shape[0])
    return (sum(p.numel() for p in cap.module.parameters(recurse=False) if p.requires_grad),)


class KroneckerProjector:
    """Seeded per-layer Kronecker projection of captured per-sample gradients.

    ``proj_dim`` is the budget per layer (see :func:`kronecker_dims`). Matrices are
    generated once per (checkpoint, layer) and kept.
    """

    #: how the per-layer dimensions and matrices are chosen; part of feature-cache keys, so features
    #: projected by an older rule are never read back (2: a narrow side leaves room for the other;
    #: 3: a convolution's input side projected by a convolution, rounded differently)
    LAYOUT_VERSION = 3

    def __init__(self, proj_dim: int = 4096, seed: int = 0, deterministic: bool = True) -> None:
        kronecker_dims(1, 1, proj_dim)  # validates proj_dim
        self.proj_dim, self.seed, self.deterministic = int(proj_dim), int(seed), bool(deterministic)
        self._cache: Dict[Tuple, Optional[Tensor]] = {}

    def _matrix(
        self, rows: int, cols: int, ckpt_idx: int, layer: str, side: str, like: Tensor
    ) -> Optional[Tensor]:
        key = (rows, cols, ckpt_idx, layer, side, like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = gaussian_matrix(
                rows, cols, self.seed, ckpt_idx, layer, side, like.dtype, like.device
            )
        return self._cache[key]

    def layer_dims(self, cap: LayerCapture) -> Tuple[int, ...]:
        """``(k_in, k_out)`` for a factored layer, ``(k,)`` for a densely projected one."""
        sizes = layer_sizes(cap)
        if len(sizes) == 2:
            return kronecker_dims(sizes[0], sizes[1], self.proj_dim)
        return (min(sizes[0], self.proj_dim),)

    def matrices(self, cap: LayerCapture, ckpt_idx: int, like: Tensor) -> Tuple[Optional[Tensor], ...]:
        """``(P_in, P_out)`` of a factored layer or ``(P,)`` of a dense one (None: the identity)."""
        dims, sizes = self.layer_dims(cap), layer_sizes(cap)
        if len(dims) == 2:
            p_in = self._matrix(dims[0], sizes[0], ckpt_idx, cap.name, "in", like)
            p_out = self._matrix(dims[1], sizes[1], ckpt_idx, cap.name, "out", like)
            return p_in, p_out
        return (self._matrix(dims[0], sizes[0], ckpt_idx, cap.name, "dense", like),)

    def project_layer(self, cap: LayerCapture, ckpt_idx: int = 0) -> Tensor:
        """``(B, k_out * k_in)`` (row-major ``P_out G_i P_in^T``) or ``(B, k)`` for one layer."""
        if cap.kind not in (LINEAR, EMBEDDING):
            g = cap.per_sample_grads()
            (p,) = self.matrices(cap, ckpt_idx, g)
            if p is None:
                return g
            if self.deterministic:
                return torch.stack([p @ g[i].clone() for i in range(g.shape[0])])
            return g @ p.T
        if not self.deterministic and _convolution_projectable(cap):
            like = _first(cap.outgrads[0])
            p_in, p_out = self.matrices(cap, ckpt_idx, like)
            pa, pd = _projected_conv_factors(cap, p_in, p_out)
            out = torch.einsum("bto,bti->boi", pd, pa).reshape(pa.shape[0], -1)
        else:
            a, d = cap.factors()
            p_in, p_out = self.matrices(cap, ckpt_idx, d)
            num = int(cap.module.weight.shape[0]) if cap.kind == EMBEDDING else None
            out = project_factors(a, d, p_in, p_out, num_embeddings=num, deterministic=self.deterministic)
        if cap.offset is not None:  # the same gradient term for every sample (an L2 penalty)
            out = out + self._project_offset(cap, p_in, p_out).to(out.dtype)
        return out

    @staticmethod
    def _project_offset(cap: LayerCapture, p_in: Optional[Tensor], p_out: Optional[Tensor]) -> Tensor:
        """``vec(P_out C P_in^T)`` for the layer's constant gradient term ``C`` (an embedding's transposed)."""
        assert cap.offset is not None
        mat = as_layer_matrix(cap, cap.offset)
        if cap.kind == EMBEDDING:
            mat = mat.T  # (dim, rows): outputs x inputs, as the factors are projected
        mat = mat.to(p_in.dtype if p_in is not None else mat.dtype)
        if p_out is not None:
            mat = p_out.to(mat.dtype) @ mat
        if p_in is not None:
            mat = mat @ p_in.T
        return mat.reshape(-1)

    def project(self, caps: Dict[str, LayerCapture], ckpt_idx: int = 0) -> Tensor:
        """``(B, sum of layer dims)``: every layer projected, concatenated in capture order."""
        parts: List[Tensor] = [self.project_layer(cap, ckpt_idx) for cap in caps.values()]
        return torch.cat(parts, dim=1)


def _first(grads: List[Optional[Tensor]]) -> Tensor:
    d = grads[0]
    if d is None:  # pragma: no cover - capture() fills missing gradients with zeros
        msg = "a recorded layer output got no gradient"
        raise RuntimeError(msg)
    return d


def _convolution_projectable(cap: LayerCapture) -> bool:
    """A captured ``nn.Conv2d`` whose input side is projected (by a convolution, see below)."""
    module = cap.module
    if cap.kind != LINEAR or not isinstance(module, nn.Conv2d):
        return False
    return module.groups == 1 and module.padding_mode == "zeros" and cap.inputs[0][0].is_floating_point()


def _projected_conv_factors(
    cap: LayerCapture, p_in: Optional[Tensor], p_out: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """``(P_in a, P_out d)`` of a convolution, ``(B, T, k_in)`` and ``(B, T, k_out)``, without unfolding.

    ``P_in`` applied to every unfolded input patch (and its bias 1) is a convolution of the
    layer's input with ``P_in`` as ``k_in`` filters of the layer's kernel shape (and
    ``P_in``'s bias column as their bias): the same numbers as unfolding and multiplying,
    up to rounding, at a fraction of the cost (no ``B x T x C kh kw`` patch matrix; 5-30x
    faster on ResNet-18's layers). Uses of a shared layer are concatenated along positions.
    """
    module = cap.module
    a_parts, d_parts = [], []
    for inputs, grads in zip(cap.inputs, cap.outgrads):
        x, d = inputs[0], _first(grads)
        rows = x.shape[0]
        if p_in is None:
            a = unfold_patches(module, x)  # (B, L, C kh kw)
            if module.bias is not None:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        else:
            weight_cols = int(module.weight[0].numel())
            filters = p_in[:, :weight_cols].reshape(p_in.shape[0], *module.weight.shape[1:])
            bias = p_in[:, weight_cols] if module.bias is not None else None
            a = F.conv2d(x, filters, bias, module.stride, module.padding, module.dilation)
            a = a.reshape(rows, p_in.shape[0], -1).transpose(1, 2)
        d = _apply(p_out, d.reshape(rows, d.shape[1], -1).transpose(1, 2))
        if cap.group > 1:  # rows of one sample's calls become positions of that sample
            b = rows // cap.group
            a, d = a.reshape(b, -1, a.shape[-1]), d.reshape(b, -1, d.shape[-1])
        a_parts.append(a)
        d_parts.append(d)
    if len(a_parts) == 1:
        return a_parts[0], d_parts[0]
    return torch.cat(a_parts, dim=1), torch.cat(d_parts, dim=1)


def project_factors(
    a: Tensor,
    d: Tensor,
    p_in: Optional[Tensor],
    p_out: Optional[Tensor],
    num_embeddings: Optional[int] = None,
    deterministic: bool = True,
) -> Tensor:
    """``(B, k_out * k_in)``: ``vec(sum_t (P_out d_it)(P_in a_it)^T)`` for every sample ``i``.

    ``a`` is ``(B, T, in)`` (or, for an embedding of ``num_embeddings`` rows, the
    ``(B, T)`` token ids), ``d`` is
    ``(B, T, out)``; None stands for the identity. ``deterministic`` projects one
    sample at a time (products of a shape that does not depend on the batch);
    otherwise the whole batch in a few batched products (faster on GPUs; a sample's
    last bits may then depend on the batch size).
    """

    def in_side(x: Tensor) -> Tensor:
        if num_embeddings is None:
            return _apply(p_in, x)
        if p_in is None:  # the identity on one-hot ids
            return torch.nn.functional.one_hot(x, num_embeddings).to(d.dtype)
        return p_in.T[x]  # (..., T, k_in): the columns of P_in for the ids

    if not deterministic:
        pa, pd = in_side(a), _apply(p_out, d)
        return torch.einsum("bto,bti->boi", pd, pa).reshape(a.shape[0], -1)
    rows = []
    for i in range(a.shape[0]):
        # fresh copies: BLAS may round differently at another memory alignment than a view's
        a_i, d_i = (
            a[i].clone(memory_format=torch.contiguous_format),
            d[i].clone(memory_format=torch.contiguous_format),
        )
        pa, pd = in_side(a_i), _apply(p_out, d_i)
        rows.append((pd.T @ pa).reshape(-1))
    return torch.stack(rows) if rows else d.new_zeros(0, 0)
