"""Random projection: Johnson-Lindenstrauss behaviour, determinism, chunking."""

from __future__ import annotations

import math

import pytest
import torch

import dattri_cli.func.projection as projection
from dattri_cli.errors import ConfigError
from dattri_cli.func.projection import RandomProjector, make_projector, project


def _vectors(n: int = 32, p: int = 2000, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("proj_type", ["normal", "gaussian", "rademacher"])
def test_inner_products_within_jl_bound(proj_type: str) -> None:
    x = _vectors()
    d = 1024
    y = RandomProjector(proj_dim=d, proj_type=proj_type).project(x)
    norms = x.norm(dim=1)
    err = (y @ y.T - x @ x.T).abs() / (norms[:, None] * norms[None, :])
    # JL: |<Px,Py> - <x,y>| <= eps |x||y| with eps ~ sqrt(log(n) / d); generous constant.
    eps = math.sqrt(8 * math.log(x.shape[0]) / d)
    assert err.max() < eps
    # ... and the bound is not vacuous: squared norms are unbiased to a few percent.
    ratio = (y.norm(dim=1) / norms) ** 2
    assert abs(ratio.mean().item() - 1.0) < 0.05


@pytest.mark.parametrize("proj_type", ["normal", "rademacher"])
def test_same_projection_for_any_batch_size(proj_type: str) -> None:
    x = _vectors(n=64, p=777)
    proj = RandomProjector(proj_dim=48, proj_type=proj_type, proj_max_batch_size=16)
    full = proj.project(x, ckpt_idx=3)
    for batch in (1, 7, 64):
        pieces = [proj.project(x[s : s + batch], ckpt_idx=3) for s in range(0, 64, batch)]
        assert torch.equal(torch.cat(pieces), full)
    # A fresh projector with the same settings gives the same numbers.
    assert torch.equal(
        RandomProjector(proj_dim=48, proj_type=proj_type, proj_max_batch_size=16).project(x, 3), full
    )


def _stream(proj: RandomProjector, x: torch.Tensor, sizes: list, ckpt_idx: int = 0) -> list:
    """``project_stream`` over ``x`` cut into items of ``sizes`` rows, keyed by their start row."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return list(proj.project_stream(((s, x[s : s + n]) for s, n in zip(starts, sizes)), ckpt_idx))


@pytest.mark.parametrize(
    "sizes", [[100, 100], [3, 197], [200], [1] * 200, [31, 1, 32, 33, 64, 39], [0, 200, 0]]
)
def test_stream_rows_do_not_depend_on_the_grouping(sizes: list) -> None:
    x = _vectors(n=200, p=901)
    proj = RandomProjector(proj_dim=40, proj_max_batch_size=32)
    expected = proj.project(x, ckpt_idx=2)
    out = _stream(proj, x, sizes, ckpt_idx=2)
    assert [key for key, _ in out] == [sum(sizes[:i]) for i in range(len(sizes))]  # every key, in order
    assert [rows.shape for _, rows in out] == [(n, 40) for n in sizes]
    assert torch.equal(torch.cat([rows for _, rows in out]), expected)


def test_stream_projects_only_full_blocks_until_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    proj = RandomProjector(proj_dim=8, proj_max_batch_size=16)
    calls = []
    original = proj._project_blocks
    monkeypatch.setattr(
        proj, "_project_blocks", lambda rows, k, n, b: calls.append(n) or original(rows, k, n, b)
    )
    x = _vectors(n=100, p=50)
    seen = []
    for key, _ in proj.project_stream((s, x[s : s + 10]) for s in range(0, 100, 10)):
        seen.append((key, list(calls)))
    assert calls == [1, 1, 1, 1, 1, 1, 1]  # 6 full blocks of 16 as they fill, then the padded last 4 rows
    # an item comes out as soon as its rows are projected: rows 10-19 wait for the second block
    assert seen[:3] == [(0, [1]), (10, [1, 1]), (20, [1, 1])]


def test_stream_keeps_empty_items_in_place_and_identity_passes_through() -> None:
    x = _vectors(n=5, p=30)
    proj = RandomProjector(proj_dim=6, proj_max_batch_size=4)
    items = [("a", x[:3]), ("cached", torch.empty(0, 0)), ("b", x[3:])]
    out = list(proj.project_stream(items))
    assert [k for k, _ in out] == ["a", "cached", "b"]
    assert out[1][1].shape == (0, 6)
    assert torch.equal(torch.cat([out[0][1], out[2][1]]), proj.project(x))
    same = list(RandomProjector(proj_type="identity").project_stream(items))
    assert all(a is b for (_, a), (_, b) in zip(items, same))
    with pytest.raises(ValueError, match="width"):
        list(proj.project_stream([("a", x[:1]), ("b", torch.zeros(1, 7))]))


def test_chunked_generation_matches_cached_and_is_memory_independent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(projection, "CHUNK_ELEMENTS", 40 * 32)  # 40-row chunks of a 32-column matrix
    x = _vectors(n=5, p=1000)
    cached = RandomProjector(proj_dim=32)
    streamed = RandomProjector(proj_dim=32, max_matrix_bytes=0)
    assert cached.chunk_rows == 40
    assert torch.equal(cached.project(x, 0), streamed.project(x, 0))
    assert torch.equal(cached.project(x, 0), cached.project(x, 0))  # second call from the cache
    assert not streamed._cached_chunks


def test_seed_and_checkpoint_change_the_projection() -> None:
    x = _vectors(n=4, p=300)
    base = project(x, ckpt_idx=0, proj_dim=20, proj_seed=0)
    assert torch.equal(base, project(x, ckpt_idx=0, proj_dim=20, proj_seed=0))
    assert not torch.allclose(base, project(x, ckpt_idx=0, proj_dim=20, proj_seed=1))
    assert not torch.allclose(base, project(x, ckpt_idx=1, proj_dim=20, proj_seed=0))


def test_linear_and_scaled() -> None:
    x = _vectors(n=3, p=50)
    proj = RandomProjector(proj_dim=10, proj_type="rademacher")
    assert torch.allclose(
        proj.project(2 * x[:1] - x[1:2]), 2 * proj.project(x[:1]) - proj.project(x[1:2]), atol=1e-5
    )
    # Rademacher entries are +-1, so e_1 maps to +-1/sqrt(d) in every coordinate.
    e1 = torch.zeros(1, 50)
    e1[0, 0] = 1.0
    assert torch.allclose(proj.project(e1).abs(), torch.full((1, 10), 1 / math.sqrt(10)))


def test_identity_and_half_precision() -> None:
    x = _vectors(n=3, p=40)
    assert torch.equal(project(x, proj_type="identity"), x)
    half = project(x, proj_dim=16, use_half_precision=True)
    full = project(x, proj_dim=16)
    assert half.dtype == torch.float32
    assert torch.allclose(half, full, atol=0.05 * full.abs().max().item())


def test_defaults_follow_dattri_and_bad_kwargs_are_config_errors() -> None:
    proj = make_projector(None)
    # dattri's proj_max_batch_size is 32; ours is the projection's GEMM block (128 rows run faster)
    assert (proj.proj_dim, proj.block_rows, proj.seed, proj.proj_type) == (512, 128, 0, "normal")
    with pytest.raises(ConfigError, match="unknown projector_kwargs"):
        make_projector({"proj_dims": 3})
    with pytest.raises(ConfigError, match="proj_type"):
        make_projector({"proj_type": "sjlt"})
    with pytest.raises(ConfigError, match="proj_dim"):
        make_projector({"proj_dim": 0})


def test_long_rows_get_smaller_blocks_and_the_same_numbers() -> None:
    proj = RandomProjector(proj_dim=8, proj_max_batch_size=128)
    assert proj.rows_per_block(1000) == 128
    assert proj.rows_per_block(projection.MAX_BLOCK_BYTES // 4 // 5) == 5  # five float32 rows fit
    assert proj.rows_per_block(projection.MAX_BLOCK_BYTES) == 1
    grads = torch.randn(23, 40, generator=torch.Generator().manual_seed(0))
    small = RandomProjector(proj_dim=8, proj_max_batch_size=128)
    small.block_rows = 4  # as if rows were long: blocks of four rows, grouping still irrelevant
    whole = small.project(grads)
    parts = [out for _, out in small.project_stream([(i, grads[i : i + 1]) for i in range(23)])]
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
@pytest.mark.parametrize("keep_mb", [0, None])
def test_chunks_drawn_by_threads_give_the_same_bits(chunk_rows: int, keep_mb) -> None:
    """Each chunk has its own seeded generator: 2-5 drawing threads change no bit of ``R`` or the features."""
    grads = _vectors(n=9, p=777, seed=4)
    kwargs = {"proj_dim": 24, "proj_seed": 2, "proj_max_batch_size": 4}
    if keep_mb is not None:
        kwargs["max_matrix_mb"] = keep_mb
    # R drawn independently, chunk by chunk from its seed, as documented
    starts = range(0, 777, chunk_rows)
    independent = torch.cat(
        [
            torch.randn(
                min(chunk_rows, 777 - s),
                24,
                generator=torch.Generator().manual_seed(projection.chunk_seed(2, 1, i)),
            )
            for i, s in enumerate(starts)
        ]
    )
    results = {}
    for workers in (1, 2, 3, 5):
        proj = RandomProjector(**kwargs)
        proj.chunk_rows, proj.draw_workers = chunk_rows, workers
        drawn = torch.cat([c for _, _, c in proj._chunks(1, 777, torch.device("cpu"))])
        assert torch.equal(drawn, independent)
        results[workers] = (
            proj.project(grads, ckpt_idx=1),
            proj.project_slices([(0, grads[:, :300]), (300, grads[:, 300:])], 777, ckpt_idx=1),
        )
    for workers in (2, 3, 5):
        assert torch.equal(results[workers][0], results[1][0])
        assert torch.equal(results[workers][1], results[1][1])
    torch.testing.assert_close(results[1][0], grads @ independent / math.sqrt(24), rtol=1e-5, atol=1e-5)


def test_chunk_sequence_draws_a_bounded_number_ahead_and_repeats_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proj = RandomProjector(proj_dim=4, max_matrix_mb=0)
    proj.chunk_rows, proj.draw_workers = 10, 3
    started = []
    draw = proj._chunk

    def recording(ckpt_idx: int, idx: int, rows: int, device: torch.device) -> torch.Tensor:
        started.append(idx)
        return draw(ckpt_idx, idx, rows, device)

    monkeypatch.setattr(proj, "_chunk", recording)
    visits = [0, 1, 1, 2, 3, 4, 4, 4, 5, 6, 7, 8, 9, 2]
    runs = 0  # chunks handed out so far (a repeat in a row is the same chunk)
    for pos, chunk in enumerate(proj.chunk_sequence(0, visits, 100, torch.device("cpu"))):
        runs += pos == 0 or visits[pos] != visits[pos - 1]
        assert len(started) <= runs + 3  # at most `draw_workers` chunks drawn ahead of the held one
        assert torch.equal(chunk, draw(0, visits[pos], 10, torch.device("cpu")))
    # a chunk repeated in a row is drawn once; one visited again later (2) is drawn again
    assert sorted(started) == sorted([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 2])
    assert proj.chunks_generated == 11
