"""`batch.align_logits`: after the one shift, position t holds the distribution that
produced token t. Checked with a tiny model whose next-token logits depend only on the
current input token, sampled from autoregressively."""

from __future__ import annotations

import torch

from tropd.batch import PROMPT, STUDENT, TokenBatch, align_logits
from tropd.objectives import get_objective
from tropd.objectives.estimators import token_logprobs

from .enumeration import V


def bigram_model() -> torch.nn.Embedding:
    torch.manual_seed(0)
    model = torch.nn.Embedding(V, V).double()
    with torch.no_grad():
        model.weight.mul_(2.0)
    return model


def sample(model: torch.nn.Embedding, rows: int, length: int):
    """Sample `rows` sequences of `length` tokens after a 1-token prompt; returns tokens
    `[rows, length + 1]` and the sampler's log-prob of each token (0 at the prompt)."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (rows, 1), generator=gen)
    logprobs = [torch.zeros(rows, dtype=torch.float64)]
    with torch.no_grad():
        for _ in range(length):
            dist = torch.log_softmax(model(tokens[:, -1]), -1)
            nxt = torch.multinomial(dist.exp(), 1, generator=gen)
            logprobs.append(dist.gather(-1, nxt).squeeze(-1))
            tokens = torch.cat([tokens, nxt], 1)
    return tokens, torch.stack(logprobs, 1)


def test_position_t_holds_the_distribution_of_token_t() -> None:
    model = bigram_model()
    tokens, sampled_logprobs = sample(model, rows=16, length=4)
    raw = model(tokens)  # [B, T, V]: position t predicts token t + 1
    aligned = align_logits(raw)
    assert aligned.shape == raw.shape
    assert torch.equal(aligned[:, 0], torch.zeros_like(aligned[:, 0]))
    assert torch.equal(aligned[:, 1:], raw[:, :-1])

    recovered = token_logprobs(aligned, tokens)
    torch.testing.assert_close(
        recovered[:, 1:].double(), sampled_logprobs[:, 1:], rtol=1e-5, atol=1e-6
    )
    # the unshifted logits do not match: the test can tell the difference
    assert not torch.allclose(
        token_logprobs(raw, tokens)[:, 1:].double(), sampled_logprobs[:, 1:], atol=1e-3
    )


def test_aligned_logits_make_opd_on_policy() -> None:
    """Scoring the student's own samples with aligned logits gives ratio 1, and the loss
    reaches the model output at position t through token t + 1 only (the last output,
    which predicts nothing in the batch, gets no gradient)."""
    model = bigram_model()
    rows, length = 8, 3
    tokens, sampled_logprobs = sample(model, rows=rows, length=length)
    origin = torch.full_like(tokens, STUDENT)
    origin[:, 0] = PROMPT
    batch = TokenBatch(
        tokens=tokens,
        origin=origin,
        sampler_logprobs=sampled_logprobs,
        teacher_logprobs=sampled_logprobs - 0.5,  # reward -0.5 on every token
    )
    raw = model(tokens)
    raw.retain_grad()
    out = get_objective("opd")(align_logits(raw), batch)
    # ratio 1 everywhere: loss_t = -r_t = 0.5 on every student token
    torch.testing.assert_close(
        out.token_loss[:, 1:],
        torch.full((rows, length), 0.5, dtype=out.token_loss.dtype),
        rtol=1e-5,
        atol=1e-6,
    )
    out.loss.backward()

    assert torch.equal(raw.grad[:, -1], torch.zeros_like(raw.grad[:, -1]))
    # d loss / d raw[:, t] = -(1 / n) * ratio * r * (onehot(token t+1) - softmax(raw[:, t]))
    onehot = torch.nn.functional.one_hot(tokens[:, 1:], V).double()
    expected = 0.5 / (rows * length) * (onehot - torch.softmax(raw[:, :-1].detach(), -1))
    torch.testing.assert_close(raw.grad[:, :-1], expected, rtol=1e-5, atol=1e-7)
