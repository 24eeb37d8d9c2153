"""``model=torchvision``: any ``torchvision.models`` builder, randomly initialised, the class count from the data.

torchvision is imported only here, when this group is used: its PyPI wheels are built
against PyPI's torch, so next to another torch build (the CPU wheel) it may not
import at all, and a failed import is one line naming the ``vision`` extra.
Pretrained weights are never fetched (``weights=None``): nothing downloads at run
time; bring trained weights with ``checkpoint=``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from torch import nn

from dattri_cli.errors import ConfigError

EXTRA_HINT = "pip install 'dattri-cli[vision]' (a torchvision build matching your torch)"


def _torchvision_models() -> Any:
    try:
        import torchvision.models as models  # noqa: PLC0415 - optional, only for model=torchvision
    except Exception as exc:  # noqa: BLE001 - ImportError, or a torchvision built for another torch
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = f"model=torchvision needs an importable torchvision ({reason}): {EXTRA_HINT}"
        raise ConfigError(msg) from exc
    return models


def torchvision_model(
    name: str,
    num_classes: Optional[int] = None,
    kwargs: Optional[Dict[str, Any]] = None,
) -> nn.Module:
    """``torchvision.models.<name>(weights=None, num_classes=num_classes, **kwargs)``.

    ``final_layer`` is set to the last linear layer's name (``fc`` of ResNets,
    ``classifier...`` of others) so representer points can find it.
    """
    models = _torchvision_models()
    options = dict(kwargs or {})
    if "weights" in options or "pretrained" in options:
        msg = "model.kwargs.weights: pretrained weights are never downloaded; pass trained weights with checkpoint="
        raise ConfigError(msg)
    builder = getattr(models, name, None)
    if name.startswith("_") or not callable(builder):
        known = sorted(n for n in dir(models) if n[:1].islower() and not n.startswith("_"))
        msg = f"model.name={name!r} is not a torchvision.models builder (e.g. {', '.join(known[:6])} ...)"
        raise ConfigError(msg)
    if num_classes is not None:
        options["num_classes"] = int(num_classes)
    try:
        model = builder(weights=None, **options)
    except (TypeError, ValueError) as exc:
        msg = f"cannot build torchvision.models.{name} ({exc})"
        raise ConfigError(msg) from exc
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if last:
        model.final_layer = last[-1]
    return model
