"""The chunked LM head (`HeadLogits`, the training loop's fast path) computes the same
losses, metrics and gradients as the plain `[B, T, V]` logits, for every method that
accepts it, on a real rolled-out and teacher-scored batch (teacher prefixes included)."""

from __future__ import annotations

import pytest
import torch
from conftest import guided_rollout, tiny_config, tiny_qwen2
from transformers import LlamaForCausalLM

from tropd.batch import TokenBatch, align_logits
from tropd.config import load_config
from tropd.head import (
    HeadLogits,
    chunked_head_logits,
    chunked_head_supported,
    final_hidden_states,
    head_logits,
    last_hidden_states,
    prefix_sharing_supported,
    shared_columns,
    sparse_lookup,
)
from tropd.model_names import load_model
from tropd.models import tiny_llama_config
from tropd.objectives import REGISTRY, get_objective, list_objectives
from tropd.teacher import score_batch
from tropd.train import loop

FAST = [name for name in list_objectives() if REGISTRY[name].chunked_head]


@pytest.fixture(scope="module")
def scored(tiny_pair, tmp_path_factory):
    """(setup, batch): 3 prompts × 2 rollouts, half of them guided, scored with top-8."""
    setup, batch = guided_rollout(
        tiny_pair,
        tmp_path_factory.mktemp("run"),
        "run.steps=4",
        "model.dtype=float32",  # float32 rounding is what these tests allow (auto: bf16 on GPUs)
    )
    # Without the KV cache of the teacher's prefix writing, so that this scoring and the
    # tests' own (which find the cache used) run the same full forward: the cached states
    # come from the decoding loop's reordered weights, equal only to float32 rounding.
    batch = batch.replace(teacher_cache=None).to(loop.device_of(setup.student))  # as the loop
    batch = score_batch(setup.teacher, batch, top_k=8)  # every statistic, for every method
    reward = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], device=batch.tokens.device)
    batch = batch.replace(reward=reward)
    assert bool(batch.teacher_mask.any()) and bool(batch.student_mask.any())
    return setup, batch


def _loss_and_grads(setup, batch, objective, fast: bool):
    student = setup.student
    student.zero_grad(set_to_none=True)
    setup.chunked_head = fast
    logits = loop.student_logits(setup, student, batch)
    assert isinstance(logits, HeadLogits) == fast
    gate = torch.Generator().manual_seed(3)
    out = objective(logits, batch, generator=gate, step=2)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("name", FAST)
def test_fast_path_matches_full_logits(scored, name: str) -> None:
    setup, batch = scored
    objective = get_objective(name)
    slow, slow_grads = _loss_and_grads(setup, batch, objective, fast=False)
    fast, fast_grads = _loss_and_grads(setup, batch, objective, fast=True)
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.token_loss, slow.token_loss, rtol=1e-5, atol=1e-6)
    assert fast.metrics.keys() == slow.metrics.keys()
    for key in slow.metrics:
        assert fast.metrics[key] == pytest.approx(slow.metrics[key], rel=1e-5, abs=1e-6), key
    assert fast_grads.keys() == slow_grads.keys() and slow_grads
    for key, grad in slow_grads.items():
        torch.testing.assert_close(fast_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)


def test_head_logits_values_match_the_model(scored) -> None:
    """Log-probs and entropy at response positions equal log_softmax of the model's own
    logits; positions outside the response hold 0; every chunk size agrees."""
    setup, batch = scored
    student = setup.student
    with torch.no_grad():
        full = align_logits(
            student(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
        )
        hidden = student(
            input_ids=batch.tokens, attention_mask=batch.attention_mask, output_hidden_states=True
        ).hidden_states[-1]
    head = student.get_output_embeddings()
    expected = torch.log_softmax(full, -1).gather(-1, batch.tokens[..., None])[..., 0]
    expected = torch.where(batch.response_mask, expected, 0.0)
    logprobs = torch.log_softmax(full, -1)
    ent = torch.where(batch.response_mask, -(logprobs.exp() * logprobs).sum(-1), 0.0)
    for chunk in (1, 4, 1000):
        view = HeadLogits(hidden, head.weight, head.bias, batch.response_mask, chunk)
        torch.testing.assert_close(view.token_logprobs(batch.tokens), expected)
        torch.testing.assert_close(view.entropy(), ent)
        assert view.shape == full.shape
        torch.testing.assert_close(
            view.logits(), torch.where(batch.response_mask[..., None], full, 0.0)
        )


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_head_logits_for_scoring_are_the_models_own(scored, chunk: int) -> None:
    """The scoring path (`chunked_head_logits`, used by the teacher and the exact reverse
    KL) gives the model's own logits at the chosen positions, in order, chunk by chunk."""
    setup, batch = scored
    model = setup.teacher
    positions = batch.response_mask.nonzero(as_tuple=True)
    with torch.no_grad():
        full = model(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
        parts = list(
            chunked_head_logits(model, batch.tokens, batch.attention_mask, positions, chunk)
        )
    n = positions[0].numel()
    assert [p.start for p, _ in parts] == list(range(0, n, chunk))
    assert all(logits.dtype == torch.float32 and len(logits) <= chunk for _, logits in parts)
    got = torch.cat([logits for _, logits in parts])
    torch.testing.assert_close(got, align_logits(full.float())[positions])


def test_head_logits_apply_the_models_final_soft_capping(tiny_pair) -> None:
    """Soft-capping (Gemma's `final_logit_softcapping`) is applied in one place, the
    shared `head_logits`; without a cap the logits are the head's own."""
    model = load_model(tiny_pair[0], "float32", "cpu")
    hidden = torch.randn(5, model.config.hidden_size)
    head = model.get_output_embeddings()
    plain = torch.nn.functional.linear(hidden, head.weight, head.bias)
    with torch.no_grad():
        torch.testing.assert_close(head_logits(model, hidden), plain)
        model.config.final_logit_softcapping = 2.0
        torch.testing.assert_close(head_logits(model, hidden), 2.0 * torch.tanh(plain / 2.0))


@pytest.mark.parametrize("chunk", [1, 2, 1000])
def test_chunked_head_gradient_matches_autograd_with_a_bias(chunk: int) -> None:
    """The hand-written backward (states, weight and bias) against autograd through
    log_softmax, for a head with a bias and gathered ids that repeat; recomputed rows
    (before the last `chunk`) and kept ones alike."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    ids = torch.randint(0, 11, (2, 5, 3))
    ids[..., 1] = ids[..., 0]  # the same id twice in one row
    upstream = torch.randn(2, 5, 3, dtype=torch.float64)

    view = HeadLogits(hidden, weight, bias, positions, chunk_size=chunk)
    (view.token_logprobs(ids) * upstream).sum().backward()
    fast = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    logits = align_logits(torch.nn.functional.linear(hidden, weight, bias))
    plain = torch.log_softmax(logits, -1).gather(-1, ids) * positions[..., None]
    (plain * upstream).sum().backward()
    for got, t in zip(fast, (hidden, weight, bias), strict=True):
        torch.testing.assert_close(got, t.grad)


def test_loop_takes_the_fast_path_only_where_it_is_exact(scored, tiny_pair, tmp_path) -> None:
    setup, _ = scored
    assert chunked_head_supported(setup.student)
    teacher, student = tiny_pair
    base = [f"model.teacher={teacher}", f"model.student={student}", "teacher.top_k=8"]
    cases = {("opd", 1024): True, ("opd", 0): False, ("gkd", 1024): False}
    for (name, chunk), expected in cases.items():
        config = load_config(None, [*base, f"objective.name={name}", f"optim.head_chunk={chunk}"])
        assert loop.build(config, tmp_path).chunked_head is expected, (name, chunk)

    class Scaled(torch.nn.Module):  # logits the head alone does not give
        def __init__(self, model):
            super().__init__()
            self.model = model

        def get_output_embeddings(self):
            return self.model.get_output_embeddings()

        def forward(self, **kwargs):
            out = self.model(**kwargs)
            out.logits = out.logits * 2
            return out

    assert not chunked_head_supported(Scaled(setup.student))


@pytest.mark.parametrize("name", list_objectives())
def test_scoring_only_what_the_method_reads_changes_nothing(scored, name: str) -> None:
    """The loop scores the teacher's top-k and entropy only for methods that declare
    them (`Objective.teacher_topk`, `.teacher_entropy`); every method gives the same loss
    and metrics on that lean batch as on a fully scored one (bar the top-k mass metric)."""
    setup, batch = scored
    objective = get_objective(name)
    top_k = 8 if objective.teacher_topk else 0
    lean = score_batch(setup.teacher, batch, top_k, entropy=objective.teacher_entropy)
    assert (lean.teacher_topk_ids is None) == (top_k == 0)
    torch.testing.assert_close(lean.teacher_logprobs, batch.teacher_logprobs)
    with torch.no_grad():
        out = setup.student(input_ids=batch.tokens, attention_mask=batch.attention_mask)
    logits = align_logits(out.logits)
    full = objective(logits, batch, generator=torch.Generator().manual_seed(3), step=2)
    part = objective(logits, lean, generator=torch.Generator().manual_seed(3), step=2)
    torch.testing.assert_close(part.loss, full.loss)
    for key, value in part.metrics.items():
        assert value == pytest.approx(full.metrics[key], rel=1e-6, abs=1e-9), key
    assert set(full.metrics) - set(part.metrics) <= {"teacher_topk_mass"}


def test_a_second_backward_through_kept_probabilities_fails_loudly() -> None:
    """The backward consumes the kept probabilities in place; autograd's version check
    must turn a reuse of the graph into an error, not a wrong gradient."""
    torch.manual_seed(0)
    hidden = torch.randn(1, 4, 3, requires_grad=True)
    weight = torch.randn(7, 3, requires_grad=True)
    positions = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    view = HeadLogits(hidden, weight, None, positions, chunk_size=8)
    loss = view.token_logprobs(torch.randint(0, 7, (1, 4))).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_chunked_head_gradient_without_positions_is_zero() -> None:
    """No response position: the head's weight gradient is zeros of its shape (the first
    block's product starts it, and here there is none)."""
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    view = HeadLogits(hidden, weight, None, torch.zeros(2, 3, dtype=torch.bool), chunk_size=2)
    view.token_logprobs(torch.zeros(2, 3, 1, dtype=torch.long)).sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


# Shared prompt prefixes (`last_hidden_states`). Rows 0-2 share their first 6 tokens; rows 1
# and 2 are right-padded.
SHARED_TOKENS = torch.tensor(
    [
        [5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
        [5, 6, 7, 8, 9, 10, 20, 21, 0, 0],
        [5, 6, 7, 8, 9, 10, 30, 31, 32, 0],
    ]
)
SHARED_MASK = (torch.arange(10) < torch.tensor([[10], [8], [9]])).long()


def _sharing_model(name: str):
    torch.manual_seed(0)
    if name == "llama":
        return LlamaForCausalLM(tiny_llama_config(48, 32, 3, num_heads=4))
    return tiny_qwen2()


@pytest.mark.parametrize(
    ("tokens", "mask", "expected"),
    [
        (SHARED_TOKENS, SHARED_MASK, 6),
        (SHARED_TOKENS[:1], SHARED_MASK[:1], 0),  # one row
        (SHARED_TOKENS[:, 3:], SHARED_MASK[:, 3:], 0),  # 3 shared: below MIN_SHARED_COLUMNS
        (SHARED_TOKENS[[0, 0]], SHARED_MASK[[0, 0]], 9),  # the same row: all but the last
        # a padding column inside the common tokens ends them
        (SHARED_TOKENS, torch.cat([SHARED_MASK[:, :5], torch.zeros(3, 5, dtype=torch.long)], 1), 5),
    ],
)
def test_shared_columns(tokens, mask, expected: int) -> None:
    assert shared_columns(tokens, mask) == expected


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_shared_prefix_states_and_gradients_match_the_plain_forward(name: str) -> None:
    """Training mode, float32: the states of every real position and the gradient of every
    parameter agree with the plain batched forward to float32 rounding (the shared rows'
    gradients are summed through the repeated keys and values). A wrong position, mask or
    missing gradient path moves them by O(1)."""
    model = _sharing_model(name).train()
    assert prefix_sharing_supported(model)
    real = SHARED_MASK.bool()
    upstream = torch.randn(3, 10, model.config.hidden_size)
    results = []
    for shared in (0, 6):
        states = last_hidden_states(model, SHARED_TOKENS, SHARED_MASK, shared)
        loss = (states * upstream)[real].sum()
        grads = torch.autograd.grad(loss, list(model.model.parameters()))  # no head here
        results.append((states[real].detach(), grads))
    (plain, plain_grads), (shared, shared_grads) = results
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-5)
    for got, want in zip(shared_grads, plain_grads, strict=True):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


def test_teacher_states_share_columns_and_equal_the_base_forward() -> None:
    """`final_hidden_states` (the teacher's scoring) runs the shared columns once and
    returns the base model's own states."""
    model = _sharing_model("llama").eval()
    calls = []
    model.model.register_forward_pre_hook(lambda m, a, k: calls.append(k), with_kwargs=True)
    with torch.no_grad():
        got = final_hidden_states(model, SHARED_TOKENS, SHARED_MASK)
        calls_shared = len(calls)
        want = model.base_model(input_ids=SHARED_TOKENS, attention_mask=SHARED_MASK)
    real = SHARED_MASK.bool()
    torch.testing.assert_close(got[real], want.last_hidden_state[real], rtol=1e-4, atol=1e-5)
    assert calls_shared >= 2 and calls[-2]["inputs_embeds"].shape[:2] == (3, 4)


def test_prefix_sharing_refuses_models_with_dropout() -> None:
    torch.manual_seed(0)
    config = tiny_llama_config(48, 32, 2, num_heads=4)
    config.attention_dropout = 0.1
    assert not prefix_sharing_supported(LlamaForCausalLM(config))


def test_training_step_with_a_shared_prompt_equals_the_plain_one(
    tiny_pair, tmp_path, monkeypatch
) -> None:
    """A whole train step (rollout, scoring, objective, backward) on prompts that share
    their first tokens: the same loss, gradient norm and gradients as with sharing off."""
    config = tiny_config(
        tiny_pair,
        tmp_path,
        "run.steps=2",
        "rollout.samples_per_prompt=2",
        "teacher.top_k=8",
        "model.dtype=float32",
    )
    results = []
    for share in (True, False):
        if not share:
            monkeypatch.setattr(loop, "shared_prompt", lambda setup, forward, micro: 0)
        setup = loop.build(config, tmp_path / f"run{share}")
        assert loop.shared_prompt(setup, setup.student, _micro_sharing()) == (6 if share else 0)
        setup.train_prompts = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 9, 10, 12, 13]]
        grads = _gradients_at_optimizer_step(setup)
        loop.seed_everything(config.run.seed, 0, 0)
        record = loop.train_step(setup, 0, rank=0, world_size=1)
        assert all(p.grad is None for p in setup.student.parameters())
        results.append((record["loss"], record["grad_norm"], grads))
    (loss, norm, grads), (plain_loss, plain_norm, plain_grads) = results
    assert loss == pytest.approx(plain_loss, rel=1e-4, abs=1e-6)
    assert norm == pytest.approx(plain_norm, rel=1e-4)
    for got, want in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * plain_norm)


def _gradients_at_optimizer_step(setup) -> list[torch.Tensor]:
    """A list that receives the student's gradients when the optimizer steps (the train
    step frees them after)."""
    grads: list[torch.Tensor] = []
    setup.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: grads.extend(
            p.grad.clone() for p in setup.student.parameters()
        )
    )
    return grads


def _micro_sharing():
    return TokenBatch(
        tokens=SHARED_TOKENS,
        origin=torch.zeros_like(SHARED_TOKENS),
        attention_mask=SHARED_MASK,
        sampler_logprobs=torch.zeros(SHARED_TOKENS.shape),
        group=torch.arange(3),
    )


@pytest.mark.parametrize("shared", [0, 6])
@pytest.mark.parametrize("tied", [True, False])
def test_sparse_lookup_gives_the_dense_lookups_gradients(tied: bool, shared: int) -> None:
    """The training forward's lookup with a sparse gradient (`sparse_lookup`): with a tied
    embedding the head's dense gradient reaches the shared weight first and the looked-up
    rows are added into it, so every gradient is dense and equals the plain lookup's to
    float32 rounding; an untied embedding keeps the plain lookup."""
    model = tiny_qwen2().train()
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    head = model.get_output_embeddings()
    upstream = torch.randn(3, 10, model.config.vocab_size)
    results = []
    for sparse in (False, True):
        model.zero_grad(set_to_none=True)
        states = last_hidden_states(model, SHARED_TOKENS, SHARED_MASK, shared, sparse=sparse)
        (head(states) * upstream)[SHARED_MASK.bool()].sum().backward()
        assert all(p.grad.layout == torch.strided for p in model.parameters())
        results.append([p.grad.clone() for p in model.parameters()])
    for got, want in zip(*results, strict=True):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
    model.zero_grad(set_to_none=True)
    sparse_lookup(model, SHARED_TOKENS).sum().backward()
    assert model.get_input_embeddings().weight.grad.is_sparse == tied
