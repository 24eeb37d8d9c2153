"""Rebuild the dataset split a score file records, treating the file as untrusted data.

``dattri show`` and ``dattri plot`` want labels and images for the rows of a score
file, and the file records the dataset config of its run. That config came from
whoever wrote the file, so it is never handed to ``hydra.utils.instantiate`` and no
name found in it is imported: its ``_target_`` is only looked up in
:data:`REGISTRY`, a fixed table of our own dataset builders, and each argument must
be one the builder takes, of a plain type (number, string, null). Anything else
gives ``None`` and a reason; the caller shows the rest of the output without labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from dattri_cli.data import Split, digits, from_files, synthetic
from dattri_cli.errors import DattriError

NOT_AVAILABLE = "labels not available for this dataset"


@dataclass(frozen=True)
class Recipe:
    """One built-in builder: the function and the plain-typed arguments it may receive."""

    build: Callable[..., Split]
    params: Mapping[str, Tuple[type, ...]]
    path_params: Tuple[str, ...] = ()  # must name existing files (checked before reading)


_INT = (int,)
_OPT_INT = (int, type(None))
_FLOAT = (int, float)
_OPT_STR = (str, type(None))

#: every dataset a score file may ask ``show``/``plot`` to rebuild, by recorded ``_target_``
REGISTRY: Dict[str, Recipe] = {
    "dattri_cli.data.digits": Recipe(digits, {"n_train": _OPT_INT, "n_test": _OPT_INT, "split_seed": _INT}),
    "dattri_cli.data.synthetic": Recipe(
        synthetic,
        {
            "n_samples": _INT,
            "n_features": _INT,
            "n_classes": _INT,
            "class_sep": _FLOAT,
            "seed": _INT,
            "n_train": _OPT_INT,
            "n_test": _OPT_INT,
            "split_seed": _INT,
        },
    ),
    "dattri_cli.data.from_files": Recipe(
        from_files,
        {
            "path": (str,),
            "test_path": _OPT_STR,
            "label_column": (str,),
            "n_train": _OPT_INT,
            "n_test": _OPT_INT,
            "split_seed": _INT,
        },
        path_params=("path", "test_path"),
    ),
}

#: synthetic data is generated in memory: a recorded size beyond this is not rebuilt
MAX_SYNTHETIC_VALUES = 50_000_000


def _plain(value: Any, allowed: Tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int subclass; no builder takes one
        return False
    return isinstance(value, allowed)


def rebuild_recorded_split(config: Any) -> Tuple[Optional[Split], str]:
    """``(split, "")`` for a recorded dataset config we know, else ``(None, reason)``.

    Only :data:`REGISTRY` builders run, with checked plain arguments; recorded label
    noise is re-applied with our own :func:`~dattri_cli.data.noise.flip_labels`.
    """
    from dattri_cli.data.noise import NOISE_KEYS, flip_labels  # noqa: PLC0415

    node = config.get("dataset") if isinstance(config, Mapping) else None
    if not isinstance(node, Mapping):
        return None, f"{NOT_AVAILABLE} (the file records no dataset config)"
    target = node.get("_target_")
    recipe = REGISTRY.get(target) if isinstance(target, str) else None
    if recipe is None:
        return (
            None,
            f"{NOT_AVAILABLE} ({str(target)[:80]!r} is not a built-in dataset; nothing named in a score file is imported)",
        )
    kwargs: Dict[str, Any] = {}
    for key, value in node.items():
        if key == "_target_" or key in NOISE_KEYS:
            continue
        allowed = recipe.params.get(key)
        if allowed is None or not _plain(value, allowed):
            return (
                None,
                f"{NOT_AVAILABLE} (recorded dataset.{key}={str(value)[:40]!r} is not an argument of {target})",
            )
        kwargs[key] = value
    for key in recipe.path_params:
        if kwargs.get(key) is not None and not Path(kwargs[key]).expanduser().is_file():
            return None, f"{NOT_AVAILABLE} (the recorded data file {kwargs[key]} does not exist here)"
    if recipe.build is synthetic:
        size = int(kwargs.get("n_samples", 2000)) * int(kwargs.get("n_features", 20))
        if size > MAX_SYNTHETIC_VALUES:
            return None, f"{NOT_AVAILABLE} (the recorded synthetic data is too large to regenerate)"
    fraction, noise_seed = node.get(NOISE_KEYS[0], 0.0), node.get(NOISE_KEYS[1], 0)
    if not _plain(fraction or 0.0, _FLOAT) or not _plain(noise_seed or 0, _INT):
        return None, f"{NOT_AVAILABLE} (recorded label noise settings are not numbers)"
    try:
        split = recipe.build(**kwargs)
        split, _ = flip_labels(split, float(fraction or 0.0), int(noise_seed or 0))
    except (DattriError, ValueError, TypeError, OSError) as exc:
        return None, f"{NOT_AVAILABLE} ({str(exc)[:160]})"
    return split, ""
