"""Seeded random projection of per-sample gradients (Johnson-Lindenstrauss sketches).

A gradient ``g`` (``P`` entries) is mapped to ``g @ R / sqrt(proj_dim)`` where ``R``
is a ``P x proj_dim`` matrix of i.i.d. standard normal or Rademacher (+-1) entries,
so inner products are preserved in expectation.

Design choices:

* ``R`` is never materialised whole unless it fits ``max_matrix_bytes``: it is cut
  into fixed row chunks of the parameter dimension, each generated from its own
  generator seeded by ``(proj_seed, ckpt_idx, chunk_idx)``. The chunking depends
  only on ``proj_dim``, so the numbers do not depend on memory settings.
* Chunks are drawn ahead by a pool of ``torch.get_num_threads()`` threads
  (:meth:`RandomProjector.chunk_sequence`; a CPU ``torch.randn`` is single-threaded and each
  chunk has its own generator, so the bits do not depend on the thread count), at most that
  many chunks ahead of the one in use.
* The projection of one sample depends only on the seed, the checkpoint index
  and its gradient: samples are projected in row blocks of exactly
  ``proj_max_batch_size`` rows, because BLAS may round a 1-row product differently
  from a 64-row one, while in a product of fixed shape a row's result does not
  depend on the other rows. :meth:`RandomProjector.project_stream` fills these
  blocks across a whole stream of batches (a loader's), so only the stream's last
  block is zero padded; :meth:`RandomProjector.project` is a stream of one batch.
* ``proj_type="identity"`` skips the projection (exact scores; useful for tests
  and small models).

The random streams differ between CPU and CUDA generators: a fixed seed reproduces
scores on the same kind of device.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Deque, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar, Union

import torch
from torch import Tensor

from dattri_cli.errors import ConfigError

#: The same defaults as the public dattri 0.3.0 (``DEFAULT_PROJECTOR_KWARGS``,
#: plus its ``random_project`` default ``proj_type="normal"``), except
#: ``proj_max_batch_size``: dattri's CPU projector ignores it, ours multiplies row
#: blocks of exactly that many rows. 128 rows keep the projection GEMM efficient on
#: CPU (docs/benchmarks.md, "Projection block size"), and with
#: :meth:`RandomProjector.project_stream` only a stream's last block is padded.
#: ``device=None`` means "the device the gradients are on".
DEFAULT_PROJECTOR_KWARGS: Dict[str, Any] = {
    "proj_dim": 512,
    "proj_max_batch_size": 128,
    "proj_seed": 0,
    "proj_type": "normal",
    "device": None,
    "use_half_precision": False,
}

#: The caller's label of a streamed item (returned untouched).
Key = TypeVar("Key")

PROJ_TYPES = {
    "normal": "normal",
    "gaussian": "normal",
    "rademacher": "rademacher",
    "identity": "identity",
    "kronecker": "kronecker",
}
#: Keys ``projector_kwargs`` may also hold, used only when given (memory settings: never part of a result's key).
#: ``max_matrix_mb``: most MiB of the dense random matrix kept in memory per checkpoint; the
#: remaining chunks are generated again from their seeds whenever they are used (same numbers).
OPTIONAL_PROJECTOR_KEYS = ("max_matrix_mb",)

#: Most bytes of gradient rows in one projected block: fewer than ``proj_max_batch_size``
#: rows are used when each row is long (a 10M-parameter model gets 6-row blocks), so the
#: buffered rows stay bounded. Depends only on the row length, never on the batch size.
MAX_BLOCK_BYTES = 256 * 2**20
#: Byte alignment of fresh CPU tensors; a row block at another alignment is copied first.
ALIGNMENT = 64
#: Entries of ``R`` generated per chunk (64 MiB in float32), whatever ``proj_dim``.
CHUNK_ELEMENTS = 2**24
#: Chunks of the current checkpoint's matrix kept in memory (the first ones, up to this many bytes);
#: the others are generated again from their seeds on each use.
DEFAULT_MAX_MATRIX_BYTES = 1024 * 2**20


def chunk_seed(seed: int, ckpt_idx: int, chunk_idx: int) -> int:
    """A 63-bit generator seed derived from (seed, checkpoint, chunk) without collisions in practice."""
    digest = hashlib.blake2b(f"{seed}/{ckpt_idx}/{chunk_idx}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def resolve_projector_kwargs(projector_kwargs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Defaults updated with ``projector_kwargs``; unknown keys and bad values raise ConfigError."""
    kwargs = dict(DEFAULT_PROJECTOR_KWARGS)
    given = dict(projector_kwargs or {})
    unknown = sorted(set(given) - set(kwargs) - set(OPTIONAL_PROJECTOR_KEYS))
    if unknown:
        msg = f"unknown projector_kwargs {unknown}; allowed keys are {sorted(kwargs)}"
        raise ConfigError(msg)
    kwargs.update(given)
    if str(kwargs["proj_type"]).lower() not in PROJ_TYPES:
        msg = f"proj_type must be one of {sorted(PROJ_TYPES)}, got {kwargs['proj_type']!r}"
        raise ConfigError(msg)
    kwargs["proj_type"] = PROJ_TYPES[str(kwargs["proj_type"]).lower()]
    for key in ("proj_dim", "proj_max_batch_size"):
        if kwargs["proj_type"] != "identity" and (not isinstance(kwargs[key], int) or kwargs[key] < 1):
            msg = f'projector_kwargs["{key}"] must be a positive integer, got {kwargs[key]!r}'
            raise ConfigError(msg)
    if "max_matrix_mb" in kwargs:
        value = kwargs["max_matrix_mb"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            msg = f'projector_kwargs["max_matrix_mb"] must be a number >= 0, got {value!r}'
            raise ConfigError(msg)
    return kwargs


def result_projector_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``kwargs`` without the memory settings (what a feature-cache key records)."""
    return {k: v for k, v in kwargs.items() if k not in OPTIONAL_PROJECTOR_KEYS}


class RandomProjector:
    """Projects ``(batch, P)`` gradients to ``(batch, proj_dim)``, reproducibly per checkpoint."""

    def __init__(
        self,
        proj_dim: int = 512,
        proj_max_batch_size: int = 128,
        proj_seed: int = 0,
        proj_type: str = "normal",
        device: Optional[Union[str, torch.device]] = None,
        use_half_precision: bool = False,
        max_matrix_bytes: int = DEFAULT_MAX_MATRIX_BYTES,
        max_matrix_mb: Optional[float] = None,
    ) -> None:
        """Store the settings; matrices are generated lazily on first use.

        ``max_matrix_mb`` (or ``max_matrix_bytes``) bounds the memory of the kept part
        of the matrix; it never changes the numbers.
        """
        kwargs = resolve_projector_kwargs(
            {
                "proj_dim": proj_dim,
                "proj_max_batch_size": proj_max_batch_size,
                "proj_seed": proj_seed,
                "proj_type": proj_type,
                "device": device,
                "use_half_precision": use_half_precision,
            }
        )
        self.proj_dim = int(kwargs["proj_dim"])
        self.block_rows = int(kwargs["proj_max_batch_size"])
        self.seed = int(kwargs["proj_seed"])
        self.proj_type = kwargs["proj_type"]
        self.device = kwargs["device"]
        self.dtype = torch.float16 if use_half_precision else torch.float32
        if self.proj_type == "kronecker":
            msg = 'proj_type="kronecker" projects per layer: use KroneckerProjector (grad_backend="layers")'
            raise ConfigError(msg)
        self.max_matrix_bytes = int(max_matrix_mb * 2**20) if max_matrix_mb is not None else max_matrix_bytes
        self.chunk_rows = max(1, CHUNK_ELEMENTS // self.proj_dim)
        self._cache_key: Optional[Tuple[int, str]] = None
        self._cached_chunks: Dict[int, Tensor] = {}
        self._cached_bytes = 0
        #: chunks generated (a cached chunk counts once): how often the matrix was drawn
        self.chunks_generated = 0
        #: threads drawing chunks of ``R`` concurrently on a CPU (None: ``torch.get_num_threads()``);
        #: each chunk has its own seeded generator, so the numbers never depend on it
        self.draw_workers: Optional[int] = None

    # -- the random matrix ------------------------------------------------------------
    def _chunk(self, ckpt_idx: int, chunk_idx: int, rows: int, device: torch.device) -> Tensor:
        """Rows ``[chunk_idx * chunk_rows, + rows)`` of ``R``, unscaled."""
        gen = torch.Generator(device=device)
        gen.manual_seed(chunk_seed(self.seed, ckpt_idx, chunk_idx))
        shape = (rows, self.proj_dim)
        if self.proj_type == "normal":
            block = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        else:
            block = torch.randint(0, 2, shape, generator=gen, device=device).to(torch.float32).mul_(2).sub_(1)
        return block.to(self.dtype)

    def _chunk_of(self, ckpt_idx: int, idx: int, num_params: int, device: torch.device) -> Tensor:
        """Chunk ``idx`` of checkpoint ``ckpt_idx``'s matrix: kept while the budget lasts, else drawn again."""
        key = (ckpt_idx, str(device))
        if self._cache_key != key:  # another checkpoint (or device): its chunks replace the kept ones
            self._cache_key, self._cached_chunks, self._cached_bytes = key, {}, 0
        chunk = self._cached_chunks.get(idx)
        if chunk is not None:
            return chunk
        start = idx * self.chunk_rows
        chunk = self._chunk(ckpt_idx, idx, min(start + self.chunk_rows, num_params) - start, device)
        self.chunks_generated += 1
        self._keep(idx, chunk)
        return chunk

    def _chunks(self, ckpt_idx: int, num_params: int, device: torch.device):  # noqa: ANN202 - generator
        """Yield ``(start, stop, chunk)`` over the parameter dimension (the first chunks kept, see ``_chunk_of``)."""
        idxs = range(-(-num_params // self.chunk_rows))
        for idx, chunk in zip(idxs, self.chunk_sequence(ckpt_idx, idxs, num_params, device)):
            start = idx * self.chunk_rows
            yield start, start + chunk.shape[0], chunk

    def _workers(self, device: torch.device) -> int:
        """Threads drawing chunks: CPU generators only (a GPU draws far faster than it multiplies)."""
        if torch.device(device).type != "cpu":
            return 1
        workers = self.draw_workers if self.draw_workers is not None else torch.get_num_threads()
        return max(1, int(workers))

    def chunk_sequence(
        self, ckpt_idx: int, idxs: Iterable[int], num_params: int, device: torch.device
    ) -> Iterator[Tensor]:
        """Chunks ``idxs`` of checkpoint ``ckpt_idx``'s matrix in that order, drawn ahead by a thread pool.

        Drawing a chunk is one single-threaded ``torch.randn`` call on its own seeded
        generator, so ``draw_workers`` threads draw that many chunks at once with the
        same bits as one after the other. At most ``draw_workers`` chunks are drawn
        ahead of the one the caller holds (bounded memory); a chunk repeated in a row
        (two layers sharing it) is drawn once; kept chunks (``max_matrix_bytes``) are not
        drawn again.
        """
        idxs = list(idxs)
        runs: List[int] = []
        for idx in idxs:
            if not runs or runs[-1] != idx:
                runs.append(idx)
        chunks = self._drawn(ckpt_idx, runs, num_params, device)
        current: Optional[Tuple[int, Tensor]] = None
        for idx in idxs:
            if current is None or current[0] != idx:
                current = (idx, next(chunks))
            yield current[1]

    def _drawn(
        self, ckpt_idx: int, runs: List[int], num_params: int, device: torch.device
    ) -> Iterator[Tensor]:
        """The chunks ``runs`` in order; with several workers, up to that many drawn ahead in threads."""
        workers = self._workers(device)
        if workers == 1 or len(runs) == 1:
            for idx in runs:
                yield self._chunk_of(ckpt_idx, idx, num_params, device)
            return
        key = (ckpt_idx, str(device))
        if self._cache_key != key:  # another checkpoint (or device): its chunks replace the kept ones
            self._cache_key, self._cached_chunks, self._cached_bytes = key, {}, 0
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dattri-projection")
        ahead: Deque[Tuple[int, Union[Tensor, "Future[Tensor]"]]] = deque()
        following = iter(runs)

        def submit() -> None:
            idx = next(following, None)
            if idx is None:
                return
            kept = self._cached_chunks.get(idx)
            start = idx * self.chunk_rows
            rows = min(start + self.chunk_rows, num_params) - start
            ahead.append(
                (idx, kept if kept is not None else pool.submit(self._chunk, ckpt_idx, idx, rows, device))
            )

        try:
            for _ in range(workers):
                submit()
            while ahead:
                idx, item = ahead.popleft()
                if isinstance(item, Tensor):
                    chunk = item
                else:
                    chunk = item.result()
                    self.chunks_generated += 1
                    self._keep(idx, chunk)
                submit()
                yield chunk
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _keep(self, idx: int, chunk: Tensor) -> None:
        """Keep ``chunk`` of the current checkpoint while the memory budget lasts."""
        size = chunk.numel() * chunk.element_size()
        if self._cached_bytes + size <= self.max_matrix_bytes:
            self._cached_chunks[idx] = chunk
            self._cached_bytes += size

    def project_slices(
        self, slices: Iterable[Tuple[int, Tensor]], num_params: int, ckpt_idx: int = 0
    ) -> Tensor:
        """``sum_l grads_l @ R[start_l : start_l + P_l] / sqrt(proj_dim)`` (float32) for ``(start_l, grads_l)``.

        The per-layer form of :meth:`project`: each layer's ``(B, P_l)`` gradients meet the
        rows of the same matrix that its entries occupy in the flat ``num_params`` vector,
        so the result equals ``project`` of the concatenated gradients up to rounding
        (without forming them). Memory: one layer's gradients and one chunk.
        """
        out: Optional[Tensor] = None
        for start, grads in slices:
            _check_matrix(grads)
            stop = start + grads.shape[1]
            if start < 0 or stop > num_params:
                msg = f"a slice [{start}, {stop}) lies outside the {num_params} parameters"
                raise ValueError(msg)
            device = self._device_for(grads)
            rows = grads.detach().to(device=device, dtype=self.dtype)
            if out is None:
                out = torch.zeros(rows.shape[0], self.proj_dim, dtype=torch.float32, device=device)
            if self.proj_type == "identity":
                msg = "identity projections have no matrix; concatenate the gradients instead"
                raise ValueError(msg)
            if stop == start:
                continue
            idxs = range(start // self.chunk_rows, (stop - 1) // self.chunk_rows + 1)
            for idx, chunk in zip(idxs, self.chunk_sequence(ckpt_idx, idxs, num_params, device)):
                lo = idx * self.chunk_rows
                a, b = max(start, lo), min(stop, lo + chunk.shape[0])
                out += (rows[:, a - start : b - start] @ chunk[a - lo : b - lo]).float()
        if out is None:
            msg = "project_slices needs at least one slice"
            raise ValueError(msg)
        return out.div_(math.sqrt(self.proj_dim))

    # -- projection ---------------------------------------------------------------------
    def project(self, grads: Tensor, ckpt_idx: int = 0) -> Tensor:
        """``grads @ R_ckpt / sqrt(proj_dim)`` as float32 on ``grads``' device (a one-item stream)."""
        ((_, projected),) = self.project_stream([(None, grads)], ckpt_idx)
        return projected

    def project_stream(
        self, items: Iterable[Tuple[Key, Tensor]], ckpt_idx: int = 0
    ) -> Iterator[Tuple[Key, Tensor]]:
        """Project ``(key, grads)`` items; yield ``(key, projected)`` in the same order.

        Rows are buffered across items and multiplied in blocks of exactly
        :meth:`rows_per_block` rows; only the last block of the whole stream is zero padded.
        A row's result does not depend on how rows are grouped into items, so a
        loader's batches are projected without padding each batch. An item comes out
        once all its rows are projected, possibly after later items were consumed.
        Items without rows pass through in order (to interleave results from elsewhere).
        """
        if self.proj_type == "identity":
            for key, grads in items:
                _check_matrix(grads)
                yield key, grads
            return
        rows, projected = _RowQueue(), _RowQueue()
        pending: Deque[Tuple[Key, int, torch.device]] = deque()  # (key, rows, output device)
        block = self.block_rows
        for key, grads in items:
            _check_matrix(grads)
            if grads.shape[0]:  # an empty item (a cached batch) says nothing about row length
                block = self.rows_per_block(grads.shape[1])
            pending.append((key, grads.shape[0], grads.device))
            rows.push(grads.detach().to(device=self._device_for(grads), dtype=self.dtype))
            if rows.count >= block:
                projected.push(self._project_blocks(rows, ckpt_idx, rows.count // block, block))
            yield from self._finished(pending, projected)
        if rows.count:
            projected.push(self._project_blocks(rows, ckpt_idx, 1, block))
        yield from self._finished(pending, projected)

    def rows_per_block(self, num_params: int) -> int:
        """Rows per projected block: ``proj_max_batch_size``, fewer when rows of ``num_params`` are long."""
        element_size = torch.tensor([], dtype=self.dtype).element_size()
        return max(1, min(self.block_rows, MAX_BLOCK_BYTES // max(1, num_params * element_size)))

    def _device_for(self, grads: Tensor) -> torch.device:
        """The device the projection runs on: the configured one, else the gradients'."""
        return torch.device(self.device) if self.device is not None else grads.device

    def _finished(
        self, pending: Deque[Tuple[Key, int, torch.device]], projected: "_RowQueue"
    ) -> Iterator[Tuple[Key, Tensor]]:
        """Pop and yield, in order, the pending items whose rows have all been projected."""
        while pending and pending[0][1] <= projected.count:
            key, num_rows, device = pending.popleft()
            out = projected.take(num_rows, pad_to=0)
            if out is None:
                out = torch.zeros(0, self.proj_dim, dtype=torch.float32)
            yield key, out.to(device)

    def _project_blocks(self, rows: "_RowQueue", ckpt_idx: int, num_blocks: int, block: int) -> Tensor:
        """Take ``num_blocks`` blocks of ``block`` rows (the last zero padded) and project them.

        One GEMM of fixed shape per block and chunk of ``R``, so a row's result does
        not depend on its neighbours: BLAS may round a 1-row product differently.
        """
        blocks = [rows.take(block, pad_to=block, view_if_aligned=True) for _ in range(num_blocks)]
        device = blocks[0].device
        out = [torch.zeros(block, self.proj_dim, dtype=torch.float32, device=device) for _ in blocks]
        for start, stop, chunk in self._chunks(ckpt_idx, blocks[0].shape[1], device):
            for acc, block in zip(out, blocks):
                acc += (block[:, start:stop] @ chunk).float()
        return torch.cat(out).div_(math.sqrt(self.proj_dim))


def make_projector(projector_kwargs: Optional[Dict[str, Any]]) -> RandomProjector:
    """A projector from (possibly partial) ``projector_kwargs``, filled with the defaults (not Kronecker)."""
    return RandomProjector(**resolve_projector_kwargs(projector_kwargs))


def project(grads: Tensor, ckpt_idx: int = 0, **projector_kwargs: Any) -> Tensor:
    """One-off projection of ``grads`` (builds a projector; prefer :class:`RandomProjector` in loops)."""
    return make_projector(projector_kwargs).project(grads, ckpt_idx)


def _check_matrix(grads: Tensor) -> None:
    """ValueError unless ``grads`` is a ``(batch, num_params)`` matrix."""
    if grads.dim() != 2:
        msg = f"expected a (batch, num_params) gradient matrix, got shape {tuple(grads.shape)}"
        raise ValueError(msg)


class _RowQueue:
    """Rows of 2-D tensors, first in, first out; rows are copied only when taken."""

    def __init__(self) -> None:
        """An empty queue."""
        self.pieces: Deque[Tensor] = deque()
        self.count = 0

    def push(self, rows: Tensor) -> None:
        """Append the rows of ``rows`` (all rows must have the same width)."""
        if not rows.shape[0]:
            return
        if self.pieces and rows.shape[1] != self.pieces[0].shape[1]:
            msg = f"rows of width {rows.shape[1]} streamed after rows of width {self.pieces[0].shape[1]}"
            raise ValueError(msg)
        self.pieces.append(rows)
        self.count += rows.shape[0]

    def take(self, num_rows: int, pad_to: int, view_if_aligned: bool = False) -> Optional[Tensor]:
        """The first ``num_rows`` rows (fewer if fewer are queued), zero padded to ``pad_to`` rows.

        A new tensor, or with ``view_if_aligned`` a view of one queued tensor when that
        view is contiguous and 64-byte aligned like a new tensor (the copy costs ~5%
        of a projection). None when nothing is taken and nothing padded.
        """
        parts, missing = [], num_rows
        while missing and self.pieces:
            head = self.pieces.popleft()
            if head.shape[0] > missing:
                self.pieces.appendleft(head[missing:])
                head = head[:missing]
            parts.append(head)
            missing -= head.shape[0]
        taken = num_rows - missing
        self.count -= taken
        if pad_to > taken and parts:
            parts.append(parts[0].new_zeros(pad_to - taken, parts[0].shape[1]))
        if view_if_aligned and len(parts) == 1 and _aligned(parts[0]):
            return parts[0]
        # torch.cat always allocates: a fresh, aligned, contiguous tensor (BLAS may
        # take other paths, and round differently, for other layouts)
        return torch.cat(parts) if parts else None


def _aligned(rows: Tensor) -> bool:
    """Whether ``rows`` is laid out as a fresh CPU tensor would be: contiguous, 64-byte aligned."""
    return rows.is_contiguous() and rows.data_ptr() % ALIGNMENT == 0
