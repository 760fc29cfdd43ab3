"""Teacher scoring: `score_batch` against a direct full-vocabulary computation, and the
memory promise that no `[B, T, V]` tensor is ever allocated."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaForCausalLM

from tropd.batch import PROMPT, STUDENT, TEACHER, TokenBatch, align_logits, right_pad
from tropd.model_names import load_model
from tropd.models import tiny_llama_config
from tropd.teacher import score_batch

FIELDS = ("teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs", "teacher_entropy")


@pytest.fixture(scope="module")
def teacher(tiny_pair) -> torch.nn.Module:
    return load_model(tiny_pair[0], "float32", "cpu")


def make_batch(vocab: int, layout: list[tuple[int, int, int]], seed: int = 0) -> TokenBatch:
    """Right-padded rows of (prompt, teacher prefix, student) lengths with random tokens."""
    g = torch.Generator().manual_seed(seed)
    rows, origins = [], []
    for n_prompt, n_teacher, n_student in layout:
        n = n_prompt + n_teacher + n_student
        rows.append(torch.randint(0, vocab, (n,), generator=g).tolist())
        origins.append([PROMPT] * n_prompt + [TEACHER] * n_teacher + [STUDENT] * n_student)
    tokens, mask = right_pad(rows, pad_id=0)
    origin, _ = right_pad(origins, pad_id=PROMPT)
    sampler = torch.randn(tokens.shape, generator=g) * (origin == STUDENT)
    return TokenBatch(tokens=tokens, origin=origin, attention_mask=mask, sampler_logprobs=sampler)


LAYOUT = [(5, 0, 7), (3, 4, 2), (6, 2, 0), (2, 0, 12), (4, 9, 5)]


@pytest.fixture(scope="module")
def batch(teacher) -> TokenBatch:
    return make_batch(teacher.config.vocab_size, LAYOUT)


def reference(model, batch: TokenBatch) -> torch.Tensor:
    """Full-vocabulary log-probs `[B, T, V]` aligned with the tokens."""
    with torch.no_grad():
        logits = model(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
    return torch.log_softmax(align_logits(logits.float()), dim=-1)


def test_scores_match_a_full_vocabulary_computation(teacher, batch: TokenBatch) -> None:
    top_k = 5
    scored = score_batch(teacher, batch, top_k=top_k, chunk_size=4)
    logprobs = reference(teacher, batch)
    response = batch.response_mask
    assert response.sum() == sum(t + s for _, t, s in LAYOUT)

    token_lp = logprobs.gather(-1, batch.tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(
        scored.teacher_logprobs[response], token_lp[response], rtol=0, atol=1e-5
    )

    top = logprobs.topk(top_k, dim=-1)
    torch.testing.assert_close(
        scored.teacher_topk_logprobs[response], top.values[response], rtol=0, atol=1e-5
    )
    assert torch.equal(scored.teacher_topk_ids[response], top.indices[response])
    # The stored ids really carry the stored values (a consistent pair, not just sorted numbers).
    at_ids = logprobs.gather(-1, scored.teacher_topk_ids)
    torch.testing.assert_close(
        scored.teacher_topk_logprobs[response], at_ids[response], rtol=0, atol=1e-5
    )

    entropy = -(logprobs.exp() * logprobs).sum(-1)
    torch.testing.assert_close(
        scored.teacher_entropy[response], entropy[response], rtol=0, atol=1e-5
    )


def test_topk_is_sorted_descending_and_not_renormalised(teacher, batch: TokenBatch) -> None:
    scored = score_batch(teacher, batch, top_k=6, chunk_size=1024)
    values = scored.teacher_topk_logprobs[batch.response_mask]
    assert (values[:, :-1] >= values[:, 1:]).all()
    mass = values.exp().sum(-1)
    assert (mass < 1 - 1e-4).all(), "full-vocabulary log-probs: top-k mass is below one"
    assert (values <= 0).all()


def test_top_k_equal_to_vocabulary_holds_all_the_mass(teacher, batch: TokenBatch) -> None:
    vocab = teacher.config.vocab_size
    scored = score_batch(teacher, batch, top_k=vocab, chunk_size=3)
    response = batch.response_mask
    mass = scored.teacher_topk_logprobs[response].exp().sum(-1)
    torch.testing.assert_close(mass, torch.ones_like(mass), rtol=0, atol=1e-5)
    ids = scored.teacher_topk_ids[response].sort(-1).values
    assert torch.equal(ids, torch.arange(vocab).expand_as(ids))


def test_non_response_positions_are_zero(teacher, batch: TokenBatch) -> None:
    scored = score_batch(teacher, batch, top_k=4, chunk_size=2)
    outside = ~batch.response_mask
    assert outside.sum() > 10  # prompts and padding
    for name in FIELDS:
        assert getattr(scored, name)[outside].eq(0).all(), name
    # Inside the response the scores are informative (log-probs are strictly negative).
    assert scored.teacher_logprobs[batch.response_mask].lt(0).all()
    assert scored.teacher_entropy[batch.response_mask].gt(0).all()


def test_shapes_dtypes_and_untouched_fields(teacher, batch: TokenBatch) -> None:
    top_k = 3
    scored = score_batch(teacher, batch, top_k=top_k, chunk_size=1024)
    b, t = batch.tokens.shape
    assert scored.teacher_logprobs.shape == scored.teacher_entropy.shape == (b, t)
    assert scored.teacher_topk_ids.shape == scored.teacher_topk_logprobs.shape == (b, t, top_k)
    assert scored.teacher_topk_ids.dtype == torch.long
    assert scored.teacher_logprobs.dtype == torch.float32
    for name in ("tokens", "origin", "attention_mask", "sampler_logprobs"):
        assert torch.equal(getattr(scored, name), getattr(batch, name)), name
    assert batch.teacher_logprobs is None, "the input batch is not modified"


def test_chunk_size_does_not_change_the_result(teacher, batch: TokenBatch) -> None:
    results = [score_batch(teacher, batch, top_k=5, chunk_size=c) for c in (1, 3, 1024)]
    first = results[0]
    for other in results[1:]:
        assert torch.equal(first.teacher_topk_ids, other.teacher_topk_ids)
        for name in ("teacher_logprobs", "teacher_topk_logprobs", "teacher_entropy"):
            torch.testing.assert_close(
                getattr(first, name), getattr(other, name), rtol=0, atol=1e-6
            )


def test_padding_does_not_leak_into_scores(teacher, batch: TokenBatch) -> None:
    # Each row scored alone (no padding) gives the same numbers as inside the batch.
    together = score_batch(teacher, batch, top_k=4, chunk_size=8)
    for row in range(len(batch)):
        length = int(batch.attention_mask[row].sum())
        alone = score_batch(teacher, batch.select(slice(row, row + 1)).trim(), 4, 8)
        torch.testing.assert_close(
            alone.teacher_logprobs[0], together.teacher_logprobs[row, :length], rtol=0, atol=1e-5
        )


# --- memory ------------------------------------------------------------------------


class AllocationLog(TorchDispatchMode):
    """Every fresh tensor storage created by an aten op, with a running live/peak byte
    count (a storage counts as freed when the tensor that created it is collected).

    Deterministic: it counts what the ops allocate, not what the process's allocator
    happens to keep around.
    """

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in inputs:
                continue  # a view of an input, not an allocation
            inputs.add(storage.data_ptr())
            self.shapes.append(tuple(t.shape))
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, storage.nbytes())
        return out


def wide_vocab_model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab, 8, 1, num_heads=2)).eval()


def scored_allocations(vocab: int, chunk_size: int, batch: TokenBatch) -> AllocationLog:
    model = wide_vocab_model(vocab)
    log = AllocationLog()
    with log:
        scored = score_batch(model, batch, top_k=4, chunk_size=chunk_size)
    del scored
    return log


# 4 rows of 64 positions, 60 response tokens each: B*T = 256, 240 scored positions.
MEMORY_LAYOUT = [(4, 20, 40), (4, 0, 60), (4, 60, 0), (4, 30, 30)]
CHUNK = 8


@pytest.fixture(scope="module")
def memory_batch() -> TokenBatch:
    return make_batch(1024, MEMORY_LAYOUT, seed=1)


@pytest.fixture(scope="module")
def allocations(memory_batch: TokenBatch) -> dict[tuple[int, int], AllocationLog]:
    return {
        (vocab, chunk): scored_allocations(vocab, chunk, memory_batch)
        for vocab, chunk in [(1024, CHUNK), (8192, CHUNK), (8192, 4 * CHUNK)]
    }


def test_no_vocab_wide_tensor_has_more_rows_than_the_chunk(allocations, memory_batch) -> None:
    positions = int(memory_batch.tokens.numel())
    for (vocab, chunk), log in allocations.items():
        wide = [s for s in log.shapes if s and s[-1] == vocab]
        assert wide, "the LM head must show up in the log"
        rows = max(torch.Size(s[:-1]).numel() for s in wide)
        assert rows <= chunk
        assert chunk * 8 <= positions, "the batch must be much larger than a chunk"


def test_peak_memory_grows_with_chunk_times_vocab_not_positions(allocations, memory_batch) -> None:
    positions = int(memory_batch.response_mask.sum())
    fp32 = 4
    small, large, wider_chunk = (
        allocations[(1024, CHUNK)].peak,
        allocations[(8192, CHUNK)].peak,
        allocations[(8192, 4 * CHUNK)].peak,
    )
    grown = large - small  # what 7168 more vocabulary entries cost at a fixed chunk
    one_chunk = CHUNK * (8192 - 1024) * fp32
    whole_batch = positions * (8192 - 1024) * fp32
    assert one_chunk <= grown <= 6 * one_chunk
    assert grown < whole_batch / 4
    # ...and it scales with the chunk: 4x the chunk costs more than one more chunk-wide tensor.
    assert wider_chunk - large >= 3 * CHUNK * 8192 * fp32
    assert wider_chunk <= 6 * 4 * CHUNK * 8192 * fp32 + small


def test_allocation_log_sees_a_full_vocabulary_tensor(memory_batch) -> None:
    # Control for the two tests above: an unchunked computation is caught.
    model = wide_vocab_model(1024)
    log = AllocationLog()
    with log, torch.no_grad():
        model(input_ids=memory_batch.tokens).logits.log_softmax(-1)
    wide = [s for s in log.shapes if s and s[-1] == 1024]
    assert max(torch.Size(s[:-1]).numel() for s in wide) == memory_batch.tokens.numel()
    assert log.peak >= memory_batch.tokens.numel() * 1024 * 4


def test_chunks_also_stay_under_the_byte_bound(memory_batch, monkeypatch) -> None:
    """A chunk of positions whose `[chunk, V]` fp32 logits would pass `CHUNK_BYTES` is
    scored in fewer rows (here 5 of the 64 asked), with the same result."""
    import tropd.teacher as scoring

    model = wide_vocab_model(1024)
    whole = score_batch(model, memory_batch, top_k=4, chunk_size=64)
    monkeypatch.setattr(scoring, "CHUNK_BYTES", 5 * 1024 * 4 + 7)
    log = AllocationLog()
    with log:
        bounded = score_batch(model, memory_batch, top_k=4, chunk_size=64)
    wide = [s for s in log.shapes if s and s[-1] == 1024]
    assert max(torch.Size(s[:-1]).numel() for s in wide) == 5
    for name in ("teacher_logprobs", "teacher_topk_logprobs", "teacher_entropy"):
        torch.testing.assert_close(getattr(bounded, name), getattr(whole, name))
    assert torch.equal(bounded.teacher_topk_ids, whole.teacher_topk_ids)
