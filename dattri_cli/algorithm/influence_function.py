"""Influence functions: scores ``g_train^T (H + reg I)^-1 g_test``.

``H`` is the Hessian of the mean training loss over the full training set given
to ``cache`` (however that loader is batched). Positive scores mean the training
sample lowers the test target (it helps), as in the public dattri library.

The solvers (explicit, CG, LiSSA, Arnoldi) live in :mod:`dattri_cli.func.ihvp`,
shared by the task-based attributors and the function-style :class:`IFAttributor`;
each transforms all test vectors of a checkpoint in one batched solve. Their
diagnostics land in ``self.diagnostics``. The solver names are re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from dattri_cli import distributed
from dattri_cli.algorithm.base import Attributor, BaseInnerProductAttributor, TrainRows, stream_train_scores
from dattri_cli.algorithm.utils import check_finite, check_not_shuffled, num_samples, to_device
from dattri_cli.errors import ConfigError
from dattri_cli.func.batch import add_leading_dim, first_batches
from dattri_cli.func.fisher import DataInfAccumulator, check_datainf_regularization, layer_sizes_from_map
from dattri_cli.func.hessian import (
    ArnoldiEigen,
    SymmetricInverse,
    check_mode,
    explicit_hessian,
    symmetric_inverse,
)
from dattri_cli.func.ihvp import (  # noqa: F401 - re-exported: the solvers' public home before func/ihvp.py
    SOLVERS,
    Diagnostics,
    Func,
    arnoldi_eigen,
    ihvp_arnoldi,
    ihvp_cg,
    ihvp_explicit,
    ihvp_lissa,
    lissa_collate,
)
from dattri_cli.func.utils import flatten_params, per_sample_grad, unflatten_params
from dattri_cli.progress import track
from dattri_cli.task import AttributionTask

#: ``relatif_method`` values: None (plain influence), "l" and "theta" (RelatIF normalisations)
RELATIF_METHODS = (None, "l", "theta")


class _CachedFullTrain(BaseInnerProductAttributor):
    """Shared plumbing: a ``diagnostics`` dict and a clear error when ``cache`` was skipped."""

    has_diagnostics = True

    def __init__(
        self, task: AttributionTask, layer_name: Optional[Union[str, List[str]]], device: Optional[str]
    ) -> None:
        super().__init__(task, layer_name, device)
        self.diagnostics: Dict[str, Diagnostics] = {}

    def _loader(self) -> DataLoader:
        if self.full_train_dataloader is None:
            msg = f"{type(self).__name__}: call cache(full_train_dataloader) before transforming representations"
            raise ValueError(msg)
        return self.full_train_dataloader

    # -- RelatIF (dattri 0.3.0's ``relatif_method``) ------------------------------------
    def attribute(
        self, train_dataloader: DataLoader, test_dataloader: DataLoader, relatif_method: Optional[str] = None
    ) -> Tensor:
        """Scores ``(num_train, num_test)``; with ``relatif_method`` each training row is normalised.

        ``"l"`` divides by ``sqrt(g_target_i^T H^-1 g_i)``, ``"theta"`` by ``||H^-1 g_i||``
        (RelatIF, Barshan et al. 2020), per checkpoint, as dattri 0.3.0 does.
        """
        with self._relatif(relatif_method):
            return super().attribute(train_dataloader, test_dataloader)

    def self_attribute(self, train_dataloader: DataLoader, relatif_method: Optional[str] = None) -> Tensor:
        """Self-influence ``(num_train,)``, normalised per row as in :meth:`attribute` when asked."""
        with self._relatif(relatif_method):
            return super().self_attribute(train_dataloader)

    @contextlib.contextmanager
    def _relatif(self, method: Optional[str]) -> Iterator[None]:
        if method not in RELATIF_METHODS:
            msg = (
                f"relatif_method must be one of {', '.join(repr(m) for m in RELATIF_METHODS)}, got {method!r}"
            )
            raise ConfigError(msg)
        self._relatif_method = method
        try:
            yield
        finally:
            self._relatif_method = None

    def _row_weights(self, ckpt_idx: int, train_dataloader: DataLoader) -> Optional[Tensor]:
        method = getattr(self, "_relatif_method", None)
        if method is None:
            return None
        parts = []
        for batch in track(train_dataloader, "RelatIF denominators"):
            data = add_leading_dim(to_device(batch, self.device))
            solved = self._inverse_hessian_rows(ckpt_idx, self.generate_train_rep(ckpt_idx, data).detach())
            if method == "l":
                target = self.generate_test_rep(ckpt_idx, data).detach()
                parts.append((target * solved).sum(dim=1).clamp_min(1e-12).sqrt())
            else:
                parts.append(solved.norm(dim=1).clamp_min(1e-12))
        return 1.0 / torch.cat(parts)

    def _inverse_hessian_rows(self, ckpt_idx: int, rows: Tensor) -> Tensor:
        """``H^-1 g`` for every row ``g`` (the test-side transform, for the solvers where it is that)."""
        return self.transform_test_rep(ckpt_idx, rows)

    def _loss(self, ckpt_idx: int) -> Func:
        return self.task.get_loss_func(layer_name=self.layer_name, ckpt_idx=ckpt_idx)

    def _cached_stage(
        self,
        kind: str,
        ckpt_idx: int,
        settings: Dict[str, Any],
        names: List[str],
        compute: Callable[[], Dict[str, Tensor]],
    ) -> Dict[str, Tensor]:
        """Tensors ``names`` of one train-side stage, read from the runner's feature cache or computed.

        The store key covers the checkpoint, the training data and the layers (see the
        runner) plus ``settings``; without a store, or under torchrun (where the ranks
        compute together through collectives, so a hit on one rank alone would hang),
        the stage is simply computed.
        """
        if self.feature_store is None or distributed.world()[1] > 1:
            return compute()
        # sums over the loader depend on its batching in the last bits: key on it too, so a
        # run's bytes never depend on which earlier run filled the cache
        batching = {"cache_batch_size": getattr(self.full_train_dataloader, "batch_size", None)}
        store = self.feature_store(kind, ckpt_idx, {**settings, **batching})
        stored = {n: store.get(n) for n in names}
        if all(v is not None for v in stored.values()):
            store.hits += 1
            return {k: v.to(self.device) for k, v in stored.items()}
        store.misses += 1
        blocks = compute()
        for name in names:
            store.put(name, blocks[name])
        return blocks


def _json_tensor(value: Any) -> Tensor:
    """A JSON-serialisable value as a uint8 tensor (diagnostics kept beside cached tensors)."""
    return torch.tensor(list(json.dumps(value, sort_keys=True).encode()), dtype=torch.uint8)


def _from_json_tensor(tensor: Tensor) -> Any:
    return json.loads(bytes(tensor.to("cpu").tolist()).decode())


class IFAttributorExplicit(_CachedFullTrain):
    """Influence with the exact Hessian, formed and inverted densely (small models)."""

    def __init__(
        self,
        task: AttributionTask,
        layer_name: Optional[Union[str, List[str]]] = None,
        device: Optional[str] = "cpu",
        regularization: float = 0.0,
    ) -> None:
        """Add ``regularization * I`` to the Hessian before inverting it."""
        super().__init__(task, layer_name, device)
        self.regularization = regularization
        self._inverse: Dict[int, SymmetricInverse] = {}

    def prepare(self, full_train_dataloader: DataLoader, row_offset: int = 0) -> None:
        """Remember the training set; the Hessian is formed once per checkpoint on use."""
        super().prepare(full_train_dataloader, row_offset)
        self._inverse = {}

    def _inverse_for(self, ckpt_idx: int) -> SymmetricInverse:
        if ckpt_idx not in self._inverse:
            # keep one checkpoint's factorization at a time: memory is P^2, not K * P^2
            self._inverse = {}
            hess = self._cached_stage(
                "hessian",
                ckpt_idx,
                {},
                ["hessian"],
                lambda: {
                    "hessian": explicit_hessian(
                        self._loss(ckpt_idx), self._params(ckpt_idx), self._loader(), self.device
                    )
                },
            )["hessian"]
            inverse = symmetric_inverse(hess, self.regularization)
            self.diagnostics[f"checkpoint_{ckpt_idx}"] = inverse.diagnostics
            self._inverse[ckpt_idx] = inverse
        return self._inverse[ckpt_idx]

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """``(H + reg I)^-1 g`` for every row ``g`` of ``test_rep``."""
        return self._inverse_for(ckpt_idx).apply(test_rep)


class IFAttributorCG(_CachedFullTrain):
    """Influence with ``(H + reg I)^-1`` applied by conjugate gradient on HVPs."""

    def __init__(
        self,
        task: AttributionTask,
        layer_name: Optional[Union[str, List[str]]] = None,
        device: Optional[str] = "cpu",
        max_iter: int = 10,
        tol: float = 1e-7,
        mode: str = "rev-rev",
        regularization: float = 0.0,
    ) -> None:
        """CG stops after ``max_iter`` iterations or once every residual norm is below ``tol``.

        ``mode`` is the HVP auto-diff mode: "rev-rev" or "rev-fwd" (forward-over-reverse).
        """
        super().__init__(task, layer_name, device)
        check_mode(mode)
        self.max_iter, self.tol, self.mode, self.regularization = max_iter, tol, mode, regularization

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """All test rows solved together: one CG run per checkpoint."""
        solution, diagnostics = ihvp_cg(
            self._loss(ckpt_idx),
            self._params(ckpt_idx),
            self._loader(),
            self.device,
            test_rep,
            max_iter=self.max_iter,
            tol=self.tol,
            mode=self.mode,
            regularization=self.regularization,
        )
        self.diagnostics[f"checkpoint_{ckpt_idx}"] = diagnostics
        return solution


class IFAttributorLiSSA(_CachedFullTrain):
    """Influence with ``(H + damping * scaling * I)^-1`` estimated by the LiSSA recursion."""

    def __init__(
        self,
        task: AttributionTask,
        layer_name: Optional[Union[str, List[str]]] = None,
        device: Optional[str] = "cpu",
        batch_size: int = 1,
        num_repeat: int = 1,
        recursion_depth: int = 5000,
        damping: float = 0.0,
        scaling: float = 50.0,
        mode: str = "rev-rev",
    ) -> None:
        """Each of ``recursion_depth`` steps uses a fresh random minibatch of ``batch_size``.

        ``scaling`` must exceed the largest Hessian eigenvalue for the recursion to
        converge; ``damping`` adds ``damping * scaling * I`` to the Hessian.
        """
        super().__init__(task, layer_name, device)
        check_mode(mode)
        self.batch_size, self.num_repeat, self.recursion_depth = batch_size, num_repeat, recursion_depth
        self.damping, self.scaling, self.mode = damping, scaling, mode

    @staticmethod
    def lissa_collate_fn(sampled_input: List[Tensor]) -> Tuple[Tensor, List[Tuple[Tensor, ...]]]:
        """Turn ``[params, *sampled_data_tensors]`` into ``(params, data_batch)``.

        Unlike the public library this keeps the data dtypes (integer labels stay
        integers, so ``cross_entropy`` losses work unchanged).
        """
        return lissa_collate(sampled_input)

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """All test rows carried through one LiSSA recursion per checkpoint."""
        solution, diagnostics = ihvp_lissa(
            self._loss(ckpt_idx),
            self._params(ckpt_idx),
            self._loader(),
            self.device,
            test_rep,
            batch_size=self.batch_size,
            num_repeat=self.num_repeat,
            recursion_depth=self.recursion_depth,
            damping=self.damping,
            scaling=self.scaling,
            mode=self.mode,
            collate_fn=self.lissa_collate_fn,
        )
        self.diagnostics[f"checkpoint_{ckpt_idx}"] = diagnostics
        return solution


class IFAttributorArnoldi(_CachedFullTrain):
    """Influence through the top eigenpairs of ``H + reg I`` (Arnoldi, float64)."""

    def __init__(
        self,
        task: AttributionTask,
        layer_name: Optional[Union[str, List[str]]] = None,
        device: Optional[str] = "cpu",
        precompute_data_ratio: float = 1.0,
        proj_dim: int = 100,
        max_iter: int = 100,
        norm_constant: float = 1.0,
        tol: float = 1e-7,
        regularization: float = 0.0,
        seed: int = 0,
    ) -> None:
        """Keep ``proj_dim`` eigenpairs from at most ``max_iter`` Arnoldi steps.

        The Hessian uses the first ``precompute_data_ratio`` of the training batches;
        projections are divided by ``norm_constant`` (scores by its square).
        """
        super().__init__(task, layer_name, device)
        if not 0.0 < precompute_data_ratio <= 1.0:
            msg = f"precompute_data_ratio must be in (0, 1], got {precompute_data_ratio}"
            raise ConfigError(msg)
        self.precompute_data_ratio, self.proj_dim, self.max_iter = precompute_data_ratio, proj_dim, max_iter
        self.norm_constant, self.tol, self.regularization, self.seed = (
            norm_constant,
            tol,
            regularization,
            seed,
        )
        self._eigen: Dict[int, ArnoldiEigen] = {}

    def check_rank_split(self) -> None:
        """Under torchrun every rank's rows enter the Arnoldi iteration: all of them are needed."""
        if self.precompute_data_ratio != 1.0:
            msg = "IFAttributorArnoldi under torchrun needs precompute_data_ratio=1.0"
            raise ConfigError(msg)

    def prepare(self, full_train_dataloader: DataLoader, row_offset: int = 0) -> None:
        """Run Arnoldi on the (ratio of the) training set for every checkpoint."""
        super().prepare(full_train_dataloader, row_offset)
        used = math.ceil(len(full_train_dataloader) * self.precompute_data_ratio)
        batches = [b for i, b in enumerate(full_train_dataloader) if i < used]
        self._eigen = {}
        settings = {
            "proj_dim": self.proj_dim,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "regularization": self.regularization,
            "seed": self.seed,
            "batches_used": used,
        }
        for ckpt_idx in range(len(self.task.get_checkpoints())):

            def compute(k: int = ckpt_idx) -> Dict[str, Tensor]:
                eig = arnoldi_eigen(
                    self._loss(k),
                    self._params(k),
                    batches,
                    self.device,
                    proj_dim=self.proj_dim,
                    max_iter=self.max_iter,
                    norm_constant=self.norm_constant,
                    tol=self.tol,
                    regularization=self.regularization,
                    seed=self.seed,
                )
                return {
                    "eigenvalues": eig.eigenvalues,
                    "eigenvectors": eig.eigenvectors,
                    "diagnostics": _json_tensor(eig.diagnostics),
                }

            blocks = self._cached_stage(
                "arnoldi", ckpt_idx, settings, ["eigenvalues", "eigenvectors", "diagnostics"], compute
            )
            eig = ArnoldiEigen(
                blocks["eigenvalues"],
                blocks["eigenvectors"],
                self.norm_constant,
                _from_json_tensor(blocks["diagnostics"]),
            )
            self._eigen[ckpt_idx] = eig
            self.diagnostics[f"checkpoint_{ckpt_idx}"] = dict(eig.diagnostics)

    def _ensure_cached(self, train_dataloader: DataLoader) -> None:  # noqa: ARG002
        self._projector(0)

    def _projector(self, ckpt_idx: int) -> ArnoldiEigen:
        if ckpt_idx not in self._eigen:
            msg = "The Arnoldi projector has not been cached: call cache(full_train_dataloader) first"
            raise ValueError(msg)
        return self._eigen[ckpt_idx]

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """``(k, P) -> (k, kept)``: eigen-coordinates scaled by ``1/sqrt(lambda)``."""
        return self._projector(ckpt_idx).project(test_rep)

    def transform_train_rep(self, ckpt_idx: int, train_rep: Tensor) -> Tensor:
        """The same projection as the test side, so inner products give ``g^T H^-1 g'``."""
        return self._projector(ckpt_idx).project(train_rep)

    def _inverse_hessian_rows(self, ckpt_idx: int, rows: Tensor) -> Tensor:
        """``V diag(1/lambda) V^T g`` in parameter space (the projection only gives coordinates)."""
        return self._projector(ckpt_idx).apply(rows)


class IFAttributorDataInf(_CachedFullTrain):
    """Influence with DataInf's layer-wise closed-form inverse of the damped empirical Fisher."""

    def __init__(
        self,
        task: AttributionTask,
        layer_name: Optional[Union[str, List[str]]] = None,
        device: Optional[str] = "cpu",
        regularization: float = 0.0,
        fim_estimate_data_ratio: float = 1.0,
    ) -> None:
        """``regularization`` damps every per-sample Fisher; it must be positive.

        The reference default 0.0 is kept for signature compatibility, but it makes
        every rank-one per-sample Fisher singular, so it is refused here with the fix.
        The Fisher is estimated on the first ``ceil(fim_estimate_data_ratio * batches)``
        batches of the cached training loader (dattri 0.3.0's option).
        """
        super().__init__(task, layer_name, device)
        check_datainf_regularization(regularization)
        if not (isinstance(fim_estimate_data_ratio, (int, float)) and 0.0 < fim_estimate_data_ratio <= 1.0):
            msg = f"fim_estimate_data_ratio must be in (0, 1], got {fim_estimate_data_ratio!r}"
            raise ConfigError(msg)
        self.regularization = regularization
        self.fim_estimate_data_ratio = float(fim_estimate_data_ratio)

    def _layer_sizes(self, ckpt_idx: int) -> List[int]:
        pieces, layer_of = self.task.get_param(ckpt_idx, layer_name=self.layer_name, layer_split=True)
        return layer_sizes_from_map([p.numel() for p in pieces], layer_of)

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """Stream training gradients once; never store them all, never form ``P x P``."""
        acc = DataInfAccumulator(test_rep, self._layer_sizes(ckpt_idx), self.regularization)
        loader = self._loader()
        used = math.ceil(len(loader) * self.fim_estimate_data_ratio)
        for batch in track(first_batches(loader, used), "DataInf training gradients"):
            acc.add(
                self.generate_train_rep(ckpt_idx, add_leading_dim(to_device(batch, self.device))).detach()
            )
        return acc.result()


class IFAttributor(Attributor):
    """Function-style influence (the older API): a target function and a parameter dict.

    ``target_func(params, dataloader)`` returns the target summed over the batches
    of ``dataloader`` (each batch a tuple of tensors whose value is a batch mean),
    as in the reference's example. It is called with lists of single batches: a
    batch of one sample for per-sample gradients, each training batch for the
    Hessian (weighted by batch size, so the Hessian is that of the mean over the
    full training set). ``params`` is passed as a dictionary, which
    ``flatten_func``-decorated functions accept too.
    """

    has_diagnostics = True

    def __init__(
        self,
        target_func: Callable,
        params: dict,
        ihvp_solver: str = "explicit",
        ihvp_kwargs: Optional[Dict[str, Any]] = None,
        device: str = "cpu",
    ) -> None:
        """Pick ``ihvp_solver`` among explicit, cg, arnoldi and lissa, configured by ``ihvp_kwargs``."""
        if ihvp_solver not in SOLVERS:
            msg = f"ihvp_solver must be one of {', '.join(SOLVERS)}, got {ihvp_solver!r}"
            raise ConfigError(msg)
        self.solver, allowed = SOLVERS[ihvp_solver]
        self.ihvp_kwargs = dict(ihvp_kwargs or {})
        unknown = sorted(set(self.ihvp_kwargs) - set(allowed))
        if unknown:
            msg = f"ihvp_kwargs {unknown} are not options of the {ihvp_solver} solver (allowed: {', '.join(allowed)})"
            raise ConfigError(msg)
        if "mode" in self.ihvp_kwargs:
            check_mode(self.ihvp_kwargs["mode"])
        self.ihvp_solver = ihvp_solver
        self.device = device or "cpu"
        self.shapes = {k: v.shape for k, v in params.items()}
        self.params = flatten_params({k: v.detach() for k, v in params.items()}).to(self.device)
        self.target_func = target_func
        self.full_train_dataloader: Optional[DataLoader] = None
        self._init_hooks()

    def _batch_func(self, flat: Tensor, batch: Tuple[Tensor, ...]) -> Tensor:
        """The target on one batch, as a function of the flat parameter vector."""
        return self.target_func(unflatten_params(flat, self.shapes), [batch])

    def _grads(self, batch: Any) -> Tensor:
        return per_sample_grad(self._batch_func, self.params, to_device(batch, self.device)).detach()

    def prepare(self, train_dataloader: DataLoader, row_offset: int = 0) -> None:  # noqa: ARG002
        """Remember the training set whose mean-target Hessian is inverted."""
        check_not_shuffled(train_dataloader, "full_train_dataloader")
        self.full_train_dataloader = train_dataloader

    def score_rows(self, rows: TrainRows, test_dataloader: DataLoader) -> Tensor:
        """Scores of the rows' loader (see :meth:`attribute`)."""
        return self.attribute(rows.loader, test_dataloader)

    def cache(self, full_train_dataloader: DataLoader) -> None:
        """Remember the training set whose mean-target Hessian is inverted (:meth:`prepare`)."""
        self.prepare(full_train_dataloader)

    def attribute(self, train_dataloader: DataLoader, test_dataloader: DataLoader) -> Tensor:
        """Scores ``(num_train, num_test)``: one batched solve for all test gradients."""
        check_not_shuffled(train_dataloader, "train_dataloader")
        check_not_shuffled(test_dataloader, "test_dataloader")
        if self.full_train_dataloader is None:
            warnings.warn(
                "cache() was not called: treating train_dataloader as the full training set", stacklevel=2
            )
            self.cache(train_dataloader)
        test_grads = torch.cat([self._grads(b) for b in track(test_dataloader, "test gradients")])
        check_finite(test_grads, "test gradients", hint="check the test data and the parameters")
        transformed, self.diagnostics["checkpoint_0"] = self.solver(
            self._batch_func,
            self.params,
            self.full_train_dataloader,
            self.device,
            test_grads,
            **self.ihvp_kwargs,
        )
        check_finite(
            transformed,
            f"{self.ihvp_solver} inverse-Hessian-vector products",
            hint="increase `regularization`",
        )
        scores = torch.zeros(num_samples(train_dataloader), num_samples(test_dataloader), device=self.device)
        stream_train_scores(train_dataloader, self._grads, transformed.detach(), scores)
        check_finite(scores, "scores", hint="increase `regularization`")
        return scores


class IFAttributorEKFAC(_CachedFullTrain):
    """Influence through EK-FAC: a per-layer Kronecker eigenbasis with corrected eigenvalues.

    Scores are ``g_train^T (C + damping I)^-1 g_test`` with ``C`` block diagonal over
    the selected layers (see :mod:`dattri_cli.func.kfac`), the same sign and scale as
    the other influence attributors. The factors are fitted in ``cache`` over the
    full training set, for every checkpoint (ensembles are averaged like the other
    attributors); test gradients are transformed once per checkpoint, training
    gradients are streamed. ``self.factors[ckpt_idx]`` keeps the fitted factors, so
    changing ``damping`` afterwards does not refit them.
    """

    correct_eigenvalues = True

    def __init__(
        self,
        task: AttributionTask,
        module_name: Optional[Union[str, List[str]]] = None,
        device: Optional[str] = "cpu",
        damping: Optional[float] = 0.0,
        damping_ratio: float = 0.1,
        fisher: str = "gauss_newton",
        num_output_samples: Optional[int] = None,
        seed: int = 0,
        grad_backend: str = "auto",
    ) -> None:
        """Choose the layers and the damping.

        Args:
            task: the task; its ``loss_func`` must run the model once per batch.
            module_name: names from ``model.named_modules()`` of the layers to use
                (``nn.Linear`` or ``nn.Conv2d``, with or without bias); None uses every
                supported layer and warns, listing them, about trainable parameters
                of other layers, which are left out on both sides. Naming an
                unsupported or unknown module is an error.
            device: where factors and gradients live.
            damping: added to every eigenvalue. The default 0.0 is the public
                library's (no damping; a singular curvature is then refused with an
                error rather than divided by). ``None`` means automatic:
                ``damping_ratio`` times each layer's mean eigenvalue, recorded per
                layer in ``self.diagnostics`` (the packaged config uses this).
            damping_ratio: the fraction of the mean eigenvalue used when damping is None.
            fisher: "gauss_newton" (exact output-Hessian factorisation; equals the
                true Fisher for cross-entropy) or "empirical" (true-label gradients,
                as the public library does).
            num_output_samples: Gauss-Newton only. None: one backward pass per model
                output (exact; fine for a few classes). An integer ``k``: ``k`` sampled
                pseudo-gradients per sample instead (an unbiased estimate, as Kronfluence
                samples pseudo-labels), for models with many outputs per sample (a
                language model's positions x vocabulary).
            seed: seeds the sampling of ``num_output_samples``.
            grad_backend: where the scores' per-sample gradients come from. ``"func"``:
                ``torch.func`` gradients of every selected parameter (the ``(batch, P)``
                matrix), the test rows solved through the eigenbasis and rotated back.
                ``"layers"``: each layer's inputs and output gradients captured in one
                batched pass (:mod:`dattri_cli.algorithm.grad_backend`), rotated per
                position into the eigenbasis and scored there, layer by layer
                (:class:`dattri_cli.func.kfac.EigenbasisLayer`): no ``(batch, P)`` matrix,
                no rotation back; the same scores up to float rounding. ``"auto"``
                (default): ``"layers"`` from a million selected parameters on, when the
                model can be captured exactly; ``"func"`` otherwise, so small models keep
                their exact numbers. The fitting of the factors is the same either way.
        """
        super().__init__(task, None, device)
        from dattri_cli.algorithm.grad_backend import check_backend  # noqa: PLC0415
        from dattri_cli.func import kfac  # noqa: PLC0415

        if fisher not in kfac.FISHER_CHOICES:
            msg = f"fisher must be one of {', '.join(kfac.FISHER_CHOICES)}, got {fisher!r}"
            raise ConfigError(msg)
        if damping is not None and damping < 0:
            msg = f"damping must be >= 0 or null (automatic), got {damping}"
            raise ConfigError(msg)
        if not damping_ratio > 0:
            msg = f"damping_ratio must be positive, got {damping_ratio}"
            raise ConfigError(msg)
        kfac.check_num_output_samples(num_output_samples)
        self.damping, self.damping_ratio, self.fisher = damping, damping_ratio, fisher
        self.num_output_samples, self.seed = num_output_samples, int(seed)
        self.selection = kfac.select_layers(task.get_model(), module_name)
        if module_name is None:
            kfac.warn_excluded(self.selection, "EK-FAC" if self.correct_eigenvalues else "K-FAC")
        self.module_name = self.selection.modules
        self.layer_name = self.selection.param_names
        self.factors: Dict[int, Dict[str, Any]] = {}
        self.grad_backend = check_backend(grad_backend)
        self._layers: Optional[Any] = None  # a LayerGradients once the layers backend is chosen
        self._backend_chosen = False
        self._eigen: Dict[
            Tuple, Dict[str, Any]
        ] = {}  # per checkpoint (and dtype, damping): EigenbasisLayer per layer

    def cache(self, full_train_dataloader: DataLoader, max_iter: Optional[int] = None) -> None:
        """Fit (or read from the train-side cache) the factors of every checkpoint.

        ``max_iter`` (dattri 0.3.0's option) fits them on the first ``max_iter``
        batches only; None uses every batch.
        """
        self.prepare(full_train_dataloader, max_iter=max_iter)

    def prepare(
        self, full_train_dataloader: DataLoader, row_offset: int = 0, max_iter: Optional[int] = None
    ) -> None:
        """:meth:`cache`: fit the factors on the first ``max_iter`` batches (None: all)."""
        super().prepare(full_train_dataloader, row_offset)
        if max_iter is not None and not (isinstance(max_iter, int) and max_iter > 0):
            msg = f"max_iter must be a positive number of batches or None, got {max_iter!r}"
            raise ConfigError(msg)
        self.fit_batches = (
            len(full_train_dataloader) if max_iter is None else min(max_iter, len(full_train_dataloader))
        )
        self.factors, self._eigen = {}, {}
        for ckpt_idx in range(len(self.task.get_checkpoints())):
            params = self.task.named_parameters(ckpt_idx)
            params = {k: v.to(self.device) for k, v in params.items()}
            loader = first_batches(full_train_dataloader, self.fit_batches)
            factors, count = self._fit_or_load(ckpt_idx, params, loader)
            self.factors[ckpt_idx] = factors
            self.diagnostics[f"checkpoint_{ckpt_idx}"] = {
                "method": "ekfac" if self.correct_eigenvalues else "kfac",
                "fisher": self.fisher,
                "num_samples": count,
                "excluded_parameters": sorted(self.selection.excluded),
                "layers": {},
            }
            if self.num_output_samples is not None and self.fisher == "gauss_newton":
                self.diagnostics[f"checkpoint_{ckpt_idx}"]["num_output_samples"] = self.num_output_samples

    def _fit_or_load(
        self, ckpt_idx: int, params: Dict[str, Tensor], loader: DataLoader
    ) -> Tuple[Dict[str, Any], int]:
        """Fit one checkpoint's factors, or read them from the train-side cache when the runner set one.

        Damping is applied at transform time, so another damping (or test set) reuses them.
        """
        from dattri_cli.func import kfac  # noqa: PLC0415

        fast = self._large_model()

        def fit() -> Dict[str, Tensor]:
            factors, count = kfac.fit_factors(
                self.task.original_loss_func,
                params,
                loader,
                self.task.get_model(),
                self.module_name,
                fisher=self.fisher,
                correct=self.correct_eigenvalues,
                device=self.device,
                progress=track,
                num_output_samples=self.num_output_samples,
                seed=self.seed + ckpt_idx,
                fast_correction=fast,
            )
            return kfac.factors_to_blocks(factors, count)

        kind = "ekfac_factors" if self.correct_eigenvalues else "kfac_factors"
        names = kfac.factor_block_names(self.module_name, self.correct_eigenvalues)
        settings: Dict[str, Any] = {"fisher": self.fisher, "modules": list(self.module_name)}
        if fast and self.correct_eigenvalues:  # other last bits: never shared with the plain fit
            settings["correction"] = "gemm"
        if self.num_output_samples is not None and self.fisher == "gauss_newton":
            settings.update(num_output_samples=self.num_output_samples, seed=self.seed)
        if len(loader) != len(self.full_train_dataloader):  # only a prefix of the batches (max_iter)
            settings["fit_batches"] = len(loader)
        blocks = self._cached_stage(kind, ckpt_idx, settings, names, fit)
        model = self.task.get_model()
        return kfac.factors_from_blocks(
            blocks,
            self.module_name,
            kfac.bias_of(model, self.module_name),
            kfac.transposed_of(model, self.module_name),
        )

    def _large_model(self) -> bool:
        """Whether the large-model paths apply (``grad_backend="layers"``, or ``"auto"`` from a million parameters).

        They give the same values in another summation order (EK-FAC's second moments
        through GEMMs, scores in the eigenbasis), so small models under ``"auto"`` keep their bits.
        """
        from dattri_cli.algorithm.grad_backend import AUTO_MIN_PARAMS  # noqa: PLC0415

        if self.grad_backend != "auto":
            return self.grad_backend == "layers"
        shapes = self.task.param_shapes(self.layer_name, 0)
        return sum(math.prod(s) for s in shapes.values()) >= AUTO_MIN_PARAMS

    def _ensure_cached(self, train_dataloader: DataLoader) -> None:
        if not self.factors:
            super()._ensure_cached(train_dataloader)

    def layer_damping(self, ckpt_idx: int) -> Dict[str, float]:
        """The damping each layer gets at checkpoint ``ckpt_idx`` (explicit or automatic)."""
        from dattri_cli.func import kfac  # noqa: PLC0415

        out = {}
        for name, f in self._factors(ckpt_idx).items():
            evals = f.eigenvalues(self.correct_eigenvalues)
            out[name] = (
                float(self.damping)
                if self.damping is not None
                else kfac.auto_damping(evals, self.damping_ratio)
            )
        return out

    def _factors(self, ckpt_idx: int) -> Dict[str, Any]:
        if ckpt_idx not in self.factors:
            msg = f"{type(self).__name__}: call cache(full_train_dataloader) before transforming representations"
            raise ValueError(msg)
        return self.factors[ckpt_idx]

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """``(C + damping I)^-1 g`` per layer block for every row of ``test_rep``."""

        factors = self._factors(ckpt_idx)
        dampings = self.layer_damping(ckpt_idx)
        sizes = [math.prod(s) for s in self.task.param_shapes(self.layer_name, ckpt_idx).values()]
        per_layer, pos, out = [], 0, []
        for name in self.module_name:
            n_params = 2 if factors[name].has_bias else 1
            per_layer.append(sum(sizes[pos : pos + n_params]))
            pos += n_params
        for name, block in zip(self.module_name, test_rep.split(per_layer, dim=1)):
            self._check_layer(ckpt_idx, name, dampings[name])
            out.append(factors[name].inverse_apply(block, dampings[name], self.correct_eigenvalues))
        return torch.cat(out, dim=1)

    def _check_layer(self, ckpt_idx: int, name: str, damping: float) -> None:
        """Refuse a singular damped layer curvature; record its damping and eigenvalue range."""
        from dattri_cli.func import kfac  # noqa: PLC0415

        evals = self._factors(ckpt_idx)[name].eigenvalues(self.correct_eigenvalues)
        kfac.check_invertible(name, evals, damping)
        layers_diag = self.diagnostics.setdefault(f"checkpoint_{ckpt_idx}", {}).setdefault("layers", {})
        layers_diag[name] = {
            "damping": damping,
            "damping_rule": "fixed"
            if self.damping is not None
            else f"{self.damping_ratio} x mean eigenvalue",
            "mean_eigenvalue": float(evals.mean()),
            "max_eigenvalue": float(evals.max()),
            "min_eigenvalue": float(evals.min()),
        }

    # -- the layers backend: scores in the eigenbasis ------------------------------------------

    def _layer_backend(self, train_dataloader: Optional[DataLoader]) -> Optional[Any]:
        """The layers backend (a ``LayerGradients``) or None (``torch.func``), decided once."""
        from dattri_cli.algorithm.grad_backend import choose_backend, first_batch  # noqa: PLC0415
        from dattri_cli.func.layer_grads import LINEAR  # noqa: PLC0415

        if not self._backend_chosen:
            if any(f.transposed for f in self._factors(0).values()) and self.grad_backend == "layers":
                msg = (
                    'grad_backend="layers" for EK-FAC covers nn.Linear and nn.Conv2d layers only, not '
                    'transformers\' Conv1D; use grad_backend="func" (or "auto")'
                )
                raise ConfigError(msg)
            layers = None
            if not any(f.transposed for f in self._factors(0).values()):
                layers = choose_backend(
                    self.grad_backend,
                    self.task,
                    self.layer_name,
                    self.device,
                    torch.float32,  # captures keep the model's dtype
                    needs_layers=False,
                    batch_of_one=True,  # the influence functions' convention, as generate_train_rep's
                    probe_batch=(lambda: first_batch(train_dataloader))
                    if train_dataloader is not None
                    else None,
                )
            if layers is not None:
                other = [n for n in layers.layers if layers.recorder.kinds[n] != LINEAR]
                if other or sorted(layers.layers) != sorted(self.module_name):
                    msg = (
                        f'grad_backend="layers" for EK-FAC needs exactly the K-FAC layers {self.module_name}, '
                        f'captured as linear maps; got {layers.layers}; use grad_backend="func"'
                    )
                    raise ConfigError(msg)
            self._layers = layers
            self._backend_chosen = True
        return self._layers

    def _eigenbasis(self, ckpt_idx: int, dtype: torch.dtype) -> Dict[str, Any]:
        """Per layer an ``EigenbasisLayer`` of checkpoint ``ckpt_idx`` (damping checked and recorded)."""
        from dattri_cli.func import kfac  # noqa: PLC0415

        key = (ckpt_idx, dtype, self.damping, self.damping_ratio)  # damping may change after cache()
        if key not in self._eigen:
            dampings = self.layer_damping(ckpt_idx)
            factors = self._factors(ckpt_idx)
            out = {}
            for name in self.module_name:
                self._check_layer(ckpt_idx, name, dampings[name])
                out[name] = kfac.EigenbasisLayer(
                    factors[name], dampings[name], self.correct_eigenvalues, dtype
                )
            self._eigen = {k: v for k, v in self._eigen.items() if k[0] == ckpt_idx}  # one checkpoint kept
            self._eigen[key] = out
        return self._eigen[key]

    def _captures(self, ckpt_idx: int, batch: Any, target: bool) -> Tuple[Dict[str, Any], torch.dtype]:
        caps = self._layers.captures(ckpt_idx, batch, target)
        first = next(iter(caps.values()))
        return caps, first.outgrads[0][0].dtype

    def _layer_test_side(self, ckpt_idx: int, test_dataloader: DataLoader) -> Dict[str, Tuple[Tensor, Any]]:
        """Per layer ``(num_test, out, kept columns)``: the test gradients in the eigenbasis over ``E + damping``.

        Columns that are zero for every test sample are dropped (with the kept indices):
        they add nothing to any score.
        """
        from dattri_cli.algorithm.base import remembered  # noqa: PLC0415
        from dattri_cli.func import kfac  # noqa: PLC0415

        def compute() -> Dict[str, Tuple[Tensor, Any]]:
            # per batch and layer only the batch's nonzero columns are kept, so the full
            # (batch, out, in) block exists for one layer at a time
            parts: Dict[str, List[Tuple[Tensor, Any]]] = {n: [] for n in self.module_name}
            for batch in track(test_dataloader, "test gradients (eigenbasis)"):
                caps, dtype = self._captures(ckpt_idx, batch, target=True)
                eigen = self._eigenbasis(ckpt_idx, dtype)
                for name in self.module_name:
                    a, d = caps[name].factors()
                    full = eigen[name].test_side(a, d, caps[name].offset)
                    check_finite(full, f"test-side transform of layer {name}", hint="increase `damping`")
                    parts[name].append(kfac.EigenbasisLayer.live_columns(full))
                    del full, a, d
                del caps
            return {n: kfac.EigenbasisLayer.merge_columns(p) for n, p in parts.items()}

        return remembered(self.test_side_memo, ckpt_idx, test_dataloader, compute)

    def _layer_scores(self, train_dataloader: DataLoader, test_dataloader: DataLoader) -> Tensor:
        num_ckpts = len(self.task.get_checkpoints())
        scores: Optional[Tensor] = None
        for ckpt_idx in range(num_ckpts):
            test = self._layer_test_side(ckpt_idx, test_dataloader)
            weights = self._row_weights(ckpt_idx, train_dataloader)
            if scores is None:
                dtype = next(iter(test.values()))[0].dtype
                shape = (num_samples(train_dataloader), num_samples(test_dataloader))
                scores = torch.zeros(shape, dtype=dtype, device=self.device)
            row = 0
            for batch in track(train_dataloader, "scoring train batches (eigenbasis)"):
                caps, dtype = self._captures(ckpt_idx, batch, target=False)
                eigen = self._eigenbasis(ckpt_idx, dtype)
                block: Optional[Tensor] = None
                for name in self.module_name:
                    a, d = caps[name].factors()
                    part = eigen[name].scores(a, d, test[name][0], caps[name].offset, cols=test[name][1])
                    block = part if block is None else block + part
                    del a, d
                assert block is not None
                if weights is not None:
                    block = block * weights[row : row + block.shape[0], None].to(block.dtype)
                scores[row : row + block.shape[0]] += block.to(scores.dtype)
                row += block.shape[0]
        assert scores is not None
        return scores / num_ckpts

    def _layer_self_terms(
        self, ckpt_idx: int, batch: Any, with_target: bool
    ) -> Tuple[Optional[Tensor], Tensor]:
        """Per sample of ``batch``: ``g_target^T H^-1 g`` (None unless ``with_target``) and ``||H^-1 g||^2``."""
        caps, dtype = self._captures(ckpt_idx, batch, target=False)
        targets = self._captures(ckpt_idx, batch, target=True)[0] if with_target else None
        eigen = self._eigenbasis(ckpt_idx, dtype)
        dots: Optional[Tensor] = None
        norms: Optional[Tensor] = None
        for name in self.module_name:
            a, d = caps[name].factors()
            target = None
            if targets is not None:
                at, dt = targets[name].factors()
                target = (at, dt, targets[name].offset)
            dot, norm = eigen[name].self_terms(a, d, caps[name].offset, target)
            norms = norm if norms is None else norms + norm
            if dot is not None:
                dots = dot if dots is None else dots + dot
        assert norms is not None
        return dots, norms

    def _row_weights(self, ckpt_idx: int, train_dataloader: DataLoader) -> Optional[Tensor]:
        method = getattr(self, "_relatif_method", None)
        if method is None or self._layers is None:
            return super()._row_weights(ckpt_idx, train_dataloader)
        parts = []
        for batch in track(train_dataloader, "RelatIF denominators (eigenbasis)"):
            dots, norms = self._layer_self_terms(ckpt_idx, batch, with_target=method == "l")
            parts.append(dots.clamp_min(1e-12).sqrt() if method == "l" else norms.sqrt().clamp_min(1e-12))
        return 1.0 / torch.cat(parts)

    def _scores(self, train_dataloader: DataLoader, test_dataloader: DataLoader, row_offset: int) -> Tensor:
        check_not_shuffled(train_dataloader, "train_dataloader")
        check_not_shuffled(test_dataloader, "test_dataloader")
        self._ensure_cached(train_dataloader)
        if self._layer_backend(train_dataloader) is None:
            return super()._scores(train_dataloader, test_dataloader, row_offset)
        scores = self._layer_scores(train_dataloader, test_dataloader)
        check_finite(scores, "scores", hint="increase `damping`")
        return scores

    def _self_scores(self, train_dataloader: DataLoader) -> Tensor:
        check_not_shuffled(train_dataloader, "train_dataloader")
        self._ensure_cached(train_dataloader)
        if self._layer_backend(train_dataloader) is None:
            return super()._self_scores(train_dataloader)
        num_ckpts = len(self.task.get_checkpoints())
        out: Optional[Tensor] = None
        for ckpt_idx in range(num_ckpts):
            weights = self._row_weights(ckpt_idx, train_dataloader)
            values = []
            for batch in track(train_dataloader, "self-influence (eigenbasis)"):
                dots, _ = self._layer_self_terms(ckpt_idx, batch, with_target=True)
                values.append(dots)
            value = torch.cat(values)
            if weights is not None:
                value = value * weights.to(value.dtype)
            out = value if out is None else out + value
        assert out is not None
        out = out / num_ckpts
        check_finite(out, "self-influence scores", hint="increase `damping`")
        return out


class IFAttributorKFAC(IFAttributorEKFAC):
    """Influence through plain K-FAC: ``(S (x) A + damping I)^-1``, no eigenvalue correction.

    Same options as :class:`IFAttributorEKFAC`; ``cache`` skips the second pass.
    """

    correct_eigenvalues = False
