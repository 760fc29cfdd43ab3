"""oneDNN linear layers (`tropd.kernels`): the same products as `F.linear` to float32
rounding, forward and backward, inside and outside decoding loops; models keep their
parameters and state dict; anything else falls back to `F.linear` unchanged.

The bound on a float32 product's error: each of K terms of a dot product, summed in any
order, is off the exact value by at most K·eps·Σ|x_k·w_k| (the classic γ_K bound), so two
implementations differ by at most twice that."""

from __future__ import annotations

import copy
import platform
import resource

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from tropd import kernels
from tropd.head import HeadLogits, chunked_head_supported
from tropd.kernels import OneDNNLinear, decoding, onednn_available, use_onednn, use_torch_products
from tropd.models import tiny_llama_config
from tropd.rollout.engine import HFEngine, SamplingParams

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch without oneDNN here")
EPS = torch.finfo(torch.float32).eps


def bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """2·K·eps·(|x| @ |w|.T): how far two float32 evaluations of x @ w.T may differ."""
    return 2 * x.shape[-1] * EPS * (x.abs().double() @ w.abs().double().T) + 1e-30


def layer(inp: int, out: int, bias: bool, seed: int = 0) -> tuple[nn.Linear, OneDNNLinear]:
    torch.manual_seed(seed)
    plain = nn.Linear(inp, out, bias=bias)
    fast = copy.deepcopy(plain)
    holder = nn.Sequential(fast)
    assert use_onednn(holder, "onednn") == 1
    return plain, holder[0]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_forward_matches_linear_within_float32_rounding(bias, rows):
    plain, fast = layer(96, 40, bias)
    x = torch.randn(rows, 96)
    exact = x.double() @ plain.weight.double().T
    if bias:
        exact = exact + plain.bias.double()
    limit = bound(x, plain.weight) + (plain.bias.abs().double() * EPS if bias else 0)
    with torch.no_grad():
        for out in (fast(x), *_in_decoding(fast, x)):
            assert out.dtype == torch.float32 and out.shape == (rows, 40)
            assert bool(((out.double() - exact).abs() <= limit).all())


def _in_decoding(fast, x):
    with decoding():
        return [fast(x), fast(x)]  # the second call reuses the reordered weight


def test_batched_input_keeps_its_leading_dims():
    plain, fast = layer(24, 8, True)
    x = torch.randn(3, 7, 24)
    with torch.no_grad():
        out = fast(x)
    assert out.shape == (3, 7, 8)
    assert torch.allclose(
        out, plain(x), rtol=0, atol=float(bound(x.reshape(-1, 24), plain.weight.detach()).max())
    )


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_float64_within_float32_rounding(bias):
    plain, fast = layer(64, 48, bias, seed=1)
    x = torch.randn(2, 30, 64)
    up = torch.randn(2, 30, 48)
    x32 = x.clone().requires_grad_(True)
    (fast(x32) * up).sum().backward()
    x64 = x.double().requires_grad_(True)
    w64 = plain.weight.detach().double().requires_grad_(True)
    b64 = plain.bias.detach().double().requires_grad_(True) if bias else None
    (F.linear(x64, w64, b64) * up.double()).sum().backward()
    flat_up, flat_x = up.reshape(-1, 48), x.reshape(-1, 64)
    # grad_x = up @ W (K = 48 terms); grad_W = up.T @ x (K = 60 rows)
    limit_x = bound(flat_up, plain.weight.detach().T).reshape(2, 30, 64)
    limit_w = bound(flat_up.T, flat_x.T)
    assert bool(((x32.grad.double() - x64.grad).abs() <= 2 * limit_x).all())
    assert bool(((fast.weight.grad.double() - w64.grad).abs() <= 2 * limit_w).all())
    if bias:
        limit_b = 60 * EPS * flat_up.abs().double().sum(0)
        assert bool(((fast.bias.grad.double() - b64.grad).abs() <= limit_b).all())


def test_reordered_weight_lives_one_decoding_loop(monkeypatch):
    """One reorder per layer per loop; a weight changed between loops (an optimizer step)
    is read afresh by the next."""
    _, fast = layer(16, 16, False)
    calls = []
    reorder = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(kernels, "_reorder", lambda w: calls.append(1) or reorder(w.detach(), 8))
    x = torch.randn(2, 16)
    optimizer = torch.optim.AdamW(fast.parameters(), lr=0.1, fused=True)
    with torch.no_grad(), decoding():
        first = [fast(x) for _ in range(3)]
    fast(x).sum().backward()
    optimizer.step()
    with torch.no_grad(), decoding():
        after = fast(x)
    assert calls == [1, 1]
    assert all(torch.equal(first[0], f) for f in first)
    assert not torch.allclose(after, first[0])
    expected = F.linear(x, fast.weight.detach())
    assert bool(((after - expected).abs() <= bound(x, fast.weight.detach())).all())


@pytest.mark.parametrize("case", ["autocast", "float64", "no_rows"])
def test_falls_back_to_linear_bit_for_bit(case):
    plain, fast = layer(32, 8, True)
    x = torch.randn(4, 32)
    with torch.no_grad():
        if case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert torch.equal(fast(x), plain(x))
        elif case == "float64":
            fast.double(), plain.double()
            assert torch.equal(fast(x.double()), plain(x.double()))
        else:
            assert fast(x[:0]).shape == (0, 8)


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(40, 32, 2, num_heads=2)).eval()


def test_model_switches_keeping_parameters_and_logits():
    plain = tiny_model()
    fast = copy.deepcopy(plain)
    n = use_onednn(fast)
    linears = sum(type(m) is nn.Linear for m in plain.modules())
    assert n == linears > 0 and not any(type(m) is nn.Linear for m in fast.modules())
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert all(
        torch.equal(a, b)
        for a, b in zip(fast.state_dict().values(), plain.state_dict().values(), strict=True)
    )
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        a, b = plain(input_ids=ids).logits, fast(input_ids=ids).logits
    # Many layers deep: compare in log-prob space at float32 rounding of the activations.
    assert torch.allclose(a.log_softmax(-1), b.log_softmax(-1), rtol=0, atol=1e-4)
    copy.deepcopy(fast)  # a switched model copies
    assert chunked_head_supported(fast)
    use_torch_products(fast)
    assert sum(type(m) is nn.Linear for m in fast.modules()) == linears
    with torch.no_grad():
        assert torch.equal(fast(input_ids=ids).logits, a)


def test_backend_torch_leaves_the_model_alone():
    model = tiny_model()
    assert use_onednn(model, "torch") == 0
    assert not any(isinstance(m, OneDNNLinear) for m in model.modules())


def test_sampling_agrees_with_torch_products():
    """Greedy decoding from a switched model writes the same tokens, with log-probs equal
    to float32 rounding."""
    plain = tiny_model(3)
    fast = copy.deepcopy(plain)
    use_onednn(fast)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    params = SamplingParams(12, temperature=0)
    a = HFEngine(plain, 0, 39).generate(prompts, params)
    b = HFEngine(fast, 0, 39).generate(prompts, params)
    for x, y in zip(a, b, strict=True):
        assert x.tokens == y.tokens
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4)


def test_chunked_head_products_match():
    """`HeadLogits` on a switched head: log-probs and both gradients as with torch's."""
    torch.manual_seed(5)
    hidden = torch.randn(2, 6, 24)
    weight = torch.randn(50, 24)
    ids = torch.randint(0, 50, (2, 6))
    positions = torch.zeros(2, 6, dtype=torch.bool)
    positions[:, 2:] = True
    results = []
    for switched in (False, True):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        w._tropd_onednn = switched
        out = HeadLogits(h, w, None, positions, chunk_size=3).token_logprobs(ids)
        out.sum().backward()
        results.append((out.detach(), h.grad, w.grad))
    # Logits differ by at most `bound`; a log-prob by twice that (logit and log-sum-exp);
    # a gradient sums (one-hot - p)·w or ·h terms over the vocabulary and positions.
    logit = float(bound(hidden.reshape(-1, 24), weight).max())
    scale = float(weight.abs().max() + hidden.abs().max()) * positions.sum()
    for got, want, tol in zip(
        *results, (2 * logit, 4 * logit * scale, 4 * logit * scale), strict=True
    ):
        assert torch.allclose(got, want, rtol=0, atol=tol)


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's mallopt")
def test_keep_freed_memory_reuses_large_blocks():
    """mallopt takes both settings (it returns 0 for a value it refuses). A 64 MB block
    freed and allocated again then comes back from the heap, its pages already mapped:
    with glibc's defaults each allocation is a fresh mapping whose 16384 pages fault in
    one by one, here five allocations fault fewer pages than one."""
    assert kernels.keep_freed_memory()
    size = 2**24  # floats: 64 MB, 16384 pages of 4 KB
    torch.empty(size).fill_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.empty(size).fill_(1)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < size * 4 // 4096


def test_keep_freed_memory_auto_is_off_for_a_large_vocabulary_matrix():
    """`model.keep_freed_memory: auto` keeps freed memory unless a model's embedding or
    head passes `KEEP_FREED_AUTO_LIMIT` (models built on the meta device: no memory)."""
    from tropd.train.loop import KEEP_FREED_AUTO_LIMIT, keeps_freed_memory, vocabulary_bytes

    def model(vocab: int, hidden: int, tied: bool = True) -> LlamaForCausalLM:
        with torch.device("meta"):
            config = tiny_llama_config(vocab, hidden, 1, num_heads=2, tie_word_embeddings=tied)
            return LlamaForCausalLM(config)

    small, big = model(49152, 576), model(151936, 512)
    assert vocabulary_bytes(small) == 49152 * 576 * 4 <= KEEP_FREED_AUTO_LIMIT
    assert vocabulary_bytes(big) == 151936 * 512 * 4 > KEEP_FREED_AUTO_LIMIT
    assert keeps_freed_memory("auto", [small, small])
    assert not keeps_freed_memory("auto", [small, big])
    assert keeps_freed_memory(True, [big]) and not keeps_freed_memory(False, [small])


def test_mm_nt_reads_transposed_views_and_copies_other_layouts():
    """oneDNN reads a row-major matrix or the transpose of one in place; a slice with gaps
    or a broadcast is copied first. Every layout gives `a @ b.T` (float64 reference,
    float32 rounding of K = 48 terms)."""
    torch.manual_seed(0)
    a, b = torch.randn(48, 7), torch.randn(48, 5)  # so a.t() [7, 48], b.t() [5, 48]
    want = a.double().t() @ b.double()
    layouts = {
        "transposed": (a.t(), b.t()),
        "copied": (a.t().contiguous(), b.t().contiguous()),
        "gaps": (torch.randn(7, 96)[:, ::2].copy_(a.t()), b.t()),
        "broadcast": (a.t(), torch.ones(1, 48).expand(5, 48)),
    }
    for name, (x, y) in layouts.items():
        ref = want if name != "broadcast" else a.double().t() @ torch.ones(48, 5).double()
        got = kernels.mm_nt(x, y)
        assert torch.allclose(got.double(), ref, rtol=0, atol=48 * 2**-24 * 20), name
