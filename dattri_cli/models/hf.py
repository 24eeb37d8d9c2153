"""Calling Hugging Face models inside ``torch.func`` transforms.

Why: attribution needs per-sample gradients, computed with ``vmap(grad(...))``.
Transformers' handling of a 2-D ``attention_mask`` (``(batch, length)`` of 0/1)
inspects the mask's values (``padding_mask.all()`` to skip masking when nothing is
padded), which is data-dependent control flow that ``vmap`` refuses. A 4-D additive
float mask is used by the attention layers as it is, so converting the 2-D mask into
that form before the call gives the same logits and works under ``vmap``:

* encoders (BERT-style) take ``(B, 1, 1, L)``: 0 where a key may be attended to,
  the dtype's most negative value where it is padding;
* decoders (GPT-2-style) take ``(B, 1, L, L)``: the same padding term plus the causal
  term (query ``i`` sees keys ``j <= i``), since a 4-D mask replaces the causal mask
  the model would otherwise build.

Nothing here imports transformers: the helpers look at tensors and attributes only,
so they cost nothing for models that are not Hugging Face ones.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model (judged by its classes' modules, nothing imported)."""
    return any(getattr(cls, "__module__", "").startswith("transformers.") for cls in type(model).__mro__)


def is_causal_model(model: nn.Module) -> bool:
    """Whether any attention layer of ``model`` is causal (its ``is_causal`` attribute, as transformers sets it)."""
    return any(getattr(module, "is_causal", False) is True for module in model.modules())


def additive_attention_mask(mask: Tensor, dtype: torch.dtype = torch.float32, causal: bool = False) -> Tensor:
    """A 0/1 mask ``(B, L)`` (1 = attend) as the additive float mask attention layers add to their scores.

    Returns ``(B, 1, 1, L)``, or ``(B, 1, L, L)`` with the causal term when ``causal``;
    0 where attention is allowed and ``torch.finfo(dtype).min`` where it is not. A mask
    that already has 4 dimensions is returned unchanged. Pure tensor arithmetic, so it
    runs under ``vmap`` and on any device.
    """
    if mask.dim() == 4:
        return mask
    if mask.dim() != 2:
        msg = f"attention_mask must be (batch, length) or already 4-D, got shape {tuple(mask.shape)}"
        raise ValueError(msg)
    keep = mask.to(dtype)[:, None, None, :]  # (B, 1, 1, L)
    if causal:
        length = mask.shape[-1]
        lower = torch.ones(length, length, dtype=dtype, device=mask.device).tril()
        keep = keep * lower  # (B, 1, L, L): key j visible to query i when j <= i and j is not padding
    return (1.0 - keep) * torch.finfo(dtype).min


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's first floating parameter (float32 without one)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def vmap_safe_inputs(
    model: nn.Module, inputs: Dict[str, Any], causal: Optional[bool] = None
) -> Dict[str, Any]:
    """``inputs`` with a 2-D ``attention_mask`` replaced by :func:`additive_attention_mask`.

    ``causal=None`` decides from the model (:func:`is_causal_model`). Other entries,
    and inputs without a 2-D mask, pass through untouched.
    """
    mask = inputs.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        return inputs
    causal = is_causal_model(model) if causal is None else causal
    return {**inputs, "attention_mask": additive_attention_mask(mask, model_dtype(model), causal)}


def unwrap_logits(output: Any) -> Tensor:
    """The logits of a model's output.

    A tensor itself, ``.logits`` / ``["logits"]`` of a ``ModelOutput``, or a tuple's first entry.
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, dict) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    msg = (
        f"cannot find logits in the model's output of type {type(output).__name__}; return a tensor, "
        "or an object with .logits"
    )
    raise TypeError(msg)


def unwrap_loss(output: Any) -> Tensor:
    """``output.loss`` (or ``output["loss"]``) of a model called with ``labels``."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if not isinstance(loss, Tensor):
        msg = (
            f"the model's output ({type(output).__name__}) has no .loss; task=model_loss needs a "
            "model that computes its loss from `labels`"
        )
        raise TypeError(msg)
    return loss


#: ``model.head`` values and the transformers auto class each loads
HEADS = {
    "sequence_classification": "AutoModelForSequenceClassification",
    "causal_lm": "AutoModelForCausalLM",
    "image_classification": "AutoModelForImageClassification",
}
#: heads whose output width is the number of classes (``num_labels``)
CLASSIFICATION_HEADS = ("sequence_classification", "image_classification")


def hf_model(
    path: Optional[str] = None,
    head: str = "sequence_classification",
    config: Optional[Dict[str, Any]] = None,
    num_classes: Optional[int] = None,
    attn_implementation: str = "eager",
) -> nn.Module:
    """A Hugging Face model (``model=hf``): from a local folder (``path``), or randomly initialised from ``config``.

    ``path`` is read with ``local_files_only=True`` (nothing is downloaded); its weights
    are also the run's checkpoint unless ``checkpoint`` says otherwise. ``config`` is a
    mapping with ``model_type`` (``bert``, ``gpt2``, ``vit`` ...) and that model's
    config fields, for a model of a given size trained from scratch; a classification
    head gets ``num_labels`` from the data unless the config sets it.
    ``attn_implementation="eager"`` keeps attention in plain tensor operations, which
    second-order methods (Hessian-vector products) can differentiate twice.
    """
    from dattri_cli.errors import ConfigError  # noqa: PLC0415

    if head not in HEADS:
        msg = f"model.head must be one of {', '.join(HEADS)}, got {head!r}"
        raise ConfigError(msg)
    if (path is None) == (config is None):
        msg = "model=hf needs model.path (a local model folder) or model.config (a random init), exactly one"
        raise ConfigError(msg)
    try:
        import transformers  # noqa: PLC0415 - optional dependency, only for model=hf
    except ImportError as exc:
        msg = "model=hf needs transformers: pip install 'dattri-cli[text]'"
        raise ConfigError(msg) from exc
    auto = getattr(transformers, HEADS[head])
    if path is not None:
        from pathlib import Path  # noqa: PLC0415

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            msg = (
                f"model.path={path} is not a Hugging Face model folder (no config.json); use save_pretrained"
            )
            raise ConfigError(msg)
        try:
            return auto.from_pretrained(
                str(folder), local_files_only=True, attn_implementation=attn_implementation
            )
        except Exception as exc:  # noqa: BLE001 - any loading failure is the folder's
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            msg = f"cannot load a {head} model from model.path={path} ({reason})"
            raise ConfigError(msg) from exc
    fields = dict(config or {})
    model_type = fields.pop("model_type", None)
    if not model_type:
        msg = "model.config needs model_type (bert, gpt2, vit ...) and that model's config fields"
        raise ConfigError(msg)
    if head in CLASSIFICATION_HEADS and num_classes is not None and "num_labels" not in fields:
        fields["num_labels"] = int(num_classes)
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **fields)
        return auto.from_config(hf_config, attn_implementation=attn_implementation)
    except Exception as exc:  # noqa: BLE001 - an unknown model type or field
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = f"cannot build a {head} model from model.config ({reason})"
        raise ConfigError(msg) from exc
