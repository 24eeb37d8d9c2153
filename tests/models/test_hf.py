"""Hugging Face models under vmap: the additive mask keeps logits, per-sample gradients work, GPT-2 attributors.

Tiny models are built from configs; nothing is downloaded.
"""

from __future__ import annotations

import warnings
from typing import Dict, List

import pytest
import torch
from torch import Tensor
from torch.func import grad, vmap
from torch.utils.data import DataLoader

transformers = pytest.importorskip("transformers")

from dattri_cli.algorithm import influence_function as inf  # noqa: E402
from dattri_cli.algorithm.tracin import TracInAttributor  # noqa: E402
from dattri_cli.algorithm.trak import TRAKAttributor  # noqa: E402
from dattri_cli.func.batch import SAMPLE_IN_DIMS  # noqa: E402
from dattri_cli.models.hf import additive_attention_mask, is_causal_model, is_hf_model, vmap_safe_inputs  # noqa: E402
from dattri_cli.task import AttributionTask  # noqa: E402
from dattri_cli.tasks import causal_lm, classification, model_loss  # noqa: E402

VOCAB = 40


@pytest.fixture(autouse=True)
def _quiet_transformers() -> None:
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")


def _bert(attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        attn_implementation=attn,
    )
    return transformers.BertForSequenceClassification(config).eval()


def _gpt2(attn: str = "sdpa", n_layer: int = 2, n_embd: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        attn_implementation=attn,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _padded(n: int = 5, length: int = 6, seed: int = 1):
    """Right-padded token ids (pad 0), their 0/1 mask and the unpadded lengths."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, length + 1, (n,), generator=gen)
    lengths[0] = length
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (n, length), generator=gen) * mask
    return ids, mask, lengths


def test_additive_mask_values_and_shapes() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    low = torch.finfo(torch.float32).min
    enc = additive_attention_mask(mask)
    assert enc.shape == (2, 1, 1, 3)
    assert enc[0, 0, 0].tolist() == [0.0, 0.0, low]
    dec = additive_attention_mask(mask, causal=True)
    assert dec.shape == (2, 1, 3, 3)
    assert dec[0, 0].tolist() == [[0.0, low, low], [0.0, 0.0, low], [0.0, 0.0, low]]
    assert additive_attention_mask(dec) is dec
    with pytest.raises(ValueError, match="attention_mask"):
        additive_attention_mask(torch.ones(3))


def test_models_get_identical_logits_from_the_additive_mask() -> None:
    ids, mask, _ = _padded()
    bert, gpt2 = _bert(), _gpt2()
    assert is_hf_model(bert) and not is_causal_model(bert) and is_causal_model(gpt2)
    with torch.no_grad():
        for model in (bert, gpt2):
            plain = model(input_ids=ids, attention_mask=mask).logits
            converted = model(**vmap_safe_inputs(model, {"input_ids": ids, "attention_mask": mask})).logits
            keep = mask.bool() if plain.dim() == 3 else slice(None)
            torch.testing.assert_close(converted[keep], plain[keep], rtol=0, atol=1e-6)
        # without the causal term a decoder's tokens would see the future: the test can tell
        wrong = gpt2(input_ids=ids, attention_mask=additive_attention_mask(mask)).logits
        assert not torch.allclose(
            wrong[mask.bool()], gpt2(input_ids=ids, attention_mask=mask).logits[mask.bool()], atol=1e-3
        )


def _each_alone(model, loss_of_one, samples) -> List[Dict[str, Tensor]]:
    out = []
    for sample in samples:
        model.zero_grad()
        loss_of_one(*sample).backward()
        out.append({k: p.grad.detach().clone() for k, p in model.named_parameters()})
    return out


def test_bert_classifier_per_sample_gradients_under_vmap() -> None:
    model = _bert()
    ids, mask, lengths = _padded()
    labels = torch.tensor([0, 2, 1, 1, 0])
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    # users pass the 2-D mask; transformers (5.x) inspects its values, which vmap refuses, so the task converts it
    grads = vmap(grad(classification(model).loss_func), in_dims=SAMPLE_IN_DIMS)(params, batch)

    def alone(i, n, y):
        logits = model(input_ids=i[None, :n], attention_mask=torch.ones(1, int(n), dtype=torch.long)).logits
        return torch.nn.functional.cross_entropy(logits, y[None])

    for k, expected in enumerate(_each_alone(model, alone, zip(ids, lengths, labels))):
        for name in (
            "bert.embeddings.word_embeddings.weight",
            "bert.encoder.layer.1.attention.self.query.weight",
            "classifier.weight",
        ):
            torch.testing.assert_close(grads[name][k], expected[name], rtol=1e-4, atol=1e-6)


def test_gpt2_causal_lm_gradients_equal_hand_written_per_sequence_loss() -> None:
    model = _gpt2()
    ids, mask, lengths = _padded()
    params = {k: v.detach() for k, v in model.named_parameters()}
    assert "lm_head.weight" not in params  # tied to the embedding: one parameter, functional_call ties it
    grads = vmap(grad(causal_lm(model).loss_func), in_dims=SAMPLE_IN_DIMS)(
        params, {"input_ids": ids, "attention_mask": mask}
    )

    def alone(i, n):
        logits = model(input_ids=i[None, :n]).logits[0]
        return torch.nn.functional.cross_entropy(logits[:-1], i[1:n])

    for k, expected in enumerate(_each_alone(model, alone, zip(ids, lengths))):
        for name in (
            "transformer.wte.weight",
            "transformer.h.0.attn.c_attn.weight",
            "transformer.h.1.mlp.c_proj.bias",
        ):
            torch.testing.assert_close(grads[name][k], expected[name], rtol=1e-4, atol=1e-6)


def _gpt2_setup():
    # eager attention: the CPU flash-attention kernel has no second derivative (Hessian-based solvers need one)
    model = _gpt2(attn="eager", n_layer=1, n_embd=8)
    ids, mask, _ = _padded(n=6, length=5, seed=3)
    rows = [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(len(ids))]
    funcs = causal_lm(model)
    task = AttributionTask(funcs.loss_func, model, [model.state_dict()], funcs.target_func)
    return task, funcs, lambda: DataLoader(rows, batch_size=3)


WORKING = {
    "tracin": lambda task, funcs: TracInAttributor(task, [1.0], normalized_grad=False),  # noqa: ARG005
    "trak": lambda task, funcs: TRAKAttributor(
        task,
        lambda p, d: torch.exp(-funcs.target_func(p, d)),
        projector_kwargs={"proj_dim": 8},
        regularization=1e-3,
    ),
    "if_explicit": lambda task, funcs: inf.IFAttributorExplicit(  # noqa: ARG005
        task, regularization=1.0
    ),  # a random GPT-2's loss is far from convex,
    "if_datainf": lambda task, funcs: inf.IFAttributorDataInf(task, regularization=1e-2),  # noqa: ARG005
    "if_arnoldi": lambda task, funcs: inf.IFAttributorArnoldi(task, max_iter=5, proj_dim=3),  # noqa: ARG005
    # EK-FAC unwraps the ModelOutput, covers GPT-2's Conv1D layers and leaves out the tied lm_head
    "if_ekfac": lambda task, funcs: inf.IFAttributorEKFAC(task, damping=None),  # noqa: ARG005
    "if_kfac": lambda task, funcs: inf.IFAttributorKFAC(task, damping=None),  # noqa: ARG005
    # LiSSA samples dict batches (input_ids / attention_mask)
    "if_lissa": lambda task, funcs: inf.IFAttributorLiSSA(task, recursion_depth=3, batch_size=3),  # noqa: ARG005
}


#: second-order solvers differentiate twice through attention: several seconds each on 2 CPU cores
SLOW = {"if_explicit", "if_arnoldi"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(WORKING)]
)
def test_attributors_that_work_on_a_tiny_gpt2(name: str) -> None:
    task, funcs, loader = _gpt2_setup()
    attributor = WORKING[name](task, funcs)
    if name == "tracin":
        attributor.cache()
        scores = attributor.attribute(loader(), loader())
    elif name == "trak":
        attributor.cache(loader())
        scores = attributor.attribute(loader())
    else:
        attributor.cache(loader())
        scores = attributor.attribute(loader(), loader())
    assert scores.shape == (6, 6) and bool(torch.isfinite(scores).all())
    assert float(scores.abs().max()) > 0


def test_grad_cos_is_grad_dot_over_the_gradient_norms_on_a_tiny_gpt2() -> None:
    """Grad-Cos on dict batches equals Grad-Dot divided by both gradient norms (read off Grad-Dot's diagonal)."""
    task, _, loader = _gpt2_setup()
    dot, cos = (
        TracInAttributor(task, [1.0], normalized_grad=False),
        TracInAttributor(task, [1.0], normalized_grad=True),
    )
    dot.cache()
    cos.cache()
    d = dot.attribute(loader(), loader()).double()
    c = cos.attribute(loader(), loader()).double()
    norms = d.diagonal().sqrt()  # loss and target are the same function here, so the diagonal is |g_i|^2
    torch.testing.assert_close(c, d / norms[:, None] / norms[None, :], rtol=1e-4, atol=1e-5)
    assert float(c.abs().max()) <= 1 + 1e-5


@pytest.mark.slow
def test_cg_equals_the_explicit_inverse_on_a_tiny_gpt2() -> None:
    """CG through attention (dict batches, second derivatives) converges to the explicit inverse.

    A random GPT-2 with 8-wide embeddings has Hessian eigenvalues below -30, so both solve with a
    ridge of 100 (the explicit factorisation reports it positive definite there).
    """
    task, _, loader = _gpt2_setup()
    explicit = inf.IFAttributorExplicit(task, regularization=100.0)
    explicit.cache(loader())
    expected = explicit.attribute(loader(), loader())
    assert explicit.diagnostics["checkpoint_0"]["positive_definite"]
    cg = inf.IFAttributorCG(task, regularization=100.0, max_iter=100, tol=1e-9)
    cg.cache(loader())
    got = cg.attribute(loader(), loader())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_model_loss_of_a_causal_lm_equals_the_causal_lm_task_per_sample() -> None:
    """Hugging Face's own loss (labels -100 at padding) and ours agree sample by sample.

    A GPT-2 classifier vmaps too.
    """
    model = _gpt2(n_layer=1)
    ids, mask, _ = _padded()
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    ours = vmap(grad(causal_lm(model).loss_func), in_dims=SAMPLE_IN_DIMS)(params, batch)
    theirs = vmap(grad(model_loss(model).loss_func), in_dims=SAMPLE_IN_DIMS)(params, batch)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        num_labels=2,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    classifier = transformers.GPT2ForSequenceClassification(config).eval()
    params = {k: v.detach() for k, v in classifier.named_parameters()}
    labelled = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0, 1])}
    grads = vmap(grad(classification(classifier).loss_func), in_dims=SAMPLE_IN_DIMS)(params, labelled)
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())
