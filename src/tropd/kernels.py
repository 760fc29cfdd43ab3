"""Float32 linear layers on CPU through oneDNN instead of the BLAS torch calls.

torch multiplies float32 matrices on CPU with its BLAS (MKL on x86). On this project's
2-core AMD EPYC (AVX-512) MKL reaches about 211 GFLOP/s (it takes its AVX2 path on AMD
CPUs), while oneDNN, which torch also ships, reaches about 450: 2.1-2.3x on
training-sized products and 2-4x on the few-row products of decoding
(`bench/throughput.py` measures both peaks).
`use_onednn(model)` makes every `nn.Linear` of a model compute its product with oneDNN:

- with autograd (training): `_OneDNNLinear`, forward and both backward products in oneDNN;
- without (teacher scoring, eval): oneDNN on the weight as it is;
- inside a decoding loop (`decoding`, entered by `tropd.rollout.engine.decode`): oneDNN
  with each weight reordered once per loop into oneDNN's blocked layout.

The result is float32 to float32 rounding (a different summation order than BLAS, so not
bit-identical to it). A layer falls back to `F.linear` for anything else: another dtype or
device, autocast, a tensor subclass (sharded DTensor weights), or an empty input.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Backend = Literal["auto", "torch", "onednn"]
_REORDER_ROWS = 8  # the row count oneDNN's blocked layout is chosen for (hardly matters)


def onednn_available() -> bool:
    """Whether this torch can run float32 linear layers through oneDNN on this CPU (an
    x86-64 build with oneDNN; elsewhere torch's own products are used)."""
    return (
        platform.machine().lower() in {"x86_64", "amd64"}
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def routed(weight: torch.Tensor) -> bool:
    """Whether `weight` belongs to a layer `use_onednn` switched (code that multiplies by
    such a weight itself, like the chunked LM head, then uses `mm_nt` too)."""
    return getattr(weight, "_tropd_onednn", False) and _plain(weight)


def mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b.T` by oneDNN for fp32 CPU matrices `a [M, K]`, `b [N, K]` (no autograd)."""
    return _product(_dense(a), _dense(b), None)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A 2-D matrix oneDNN reads as it is: row-major, or the transpose of one (a
    column-major view, e.g. `w.t()`: read in place, faster than copying it); anything else
    (a slice with gaps, a broadcast) is copied."""
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ weight.T + bias` by oneDNN, for 2-D fp32 `x [N, in]` and a weight `[out, in]`
    (dense, or reordered by `_reorder_linear_weight`), each row-major or the transpose of
    a row-major matrix (`_dense`)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """`F.linear` of a 2-D input with its three products in oneDNN; the backward's
    transposed operands are read as transposed views, not copied (`_dense`)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _product(grad, _dense(weight.t()), None)
        if ctx.needs_input_grad[1]:
            grad_w = _product(grad.t(), x.t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def _plain(t: torch.Tensor | None) -> bool:
    """None, or a plain (not a subclass such as DTensor) fp32 CPU tensor."""
    return t is None or (
        type(t) in (torch.Tensor, nn.Parameter)
        and t.device.type == "cpu"
        and t.dtype == torch.float32
    )


def _grad(t: torch.Tensor | None) -> bool:
    return t is not None and t.requires_grad


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` whose float32 CPU products run in oneDNN (`use_onednn` swaps a
    layer's class to this one; parameters, state dict and hooks are unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if (
            not (_plain(x) and _plain(w) and _plain(b))
            or x.numel() == 0
            or torch.is_autocast_enabled("cpu")
        ):
            return F.linear(x, w, b)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or _grad(b)):
            out = _OneDNNLinear.apply(flat, w, b)
        else:
            out = _product(flat, _reordered(self, w), b)
        return out.reshape(*x.shape[:-1], out.shape[-1])


@contextmanager
def decoding() -> Iterator[None]:
    """A decoding loop's scope: inside it (on this thread), a `OneDNNLinear` called
    without autograd reorders its weight into oneDNN's blocked layout on its first call
    and reuses that at every later step (about 2x faster for a few rows than the plain
    layout); the copies are freed on exit. The weights must not change inside."""
    _SCOPES.stack = [*getattr(_SCOPES, "stack", []), {}]
    try:
        yield
    finally:
        _SCOPES.stack = _SCOPES.stack[:-1]


_SCOPES = threading.local()


def _reordered(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`weight`, reordered once per `decoding` scope; as it is outside one."""
    stack = getattr(_SCOPES, "stack", None)
    if not stack:
        return weight
    held = stack[-1]
    if layer not in held:
        held[layer] = _reorder(weight)
    return held[layer]


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _REORDER_ROWS)


def use_onednn(model: nn.Module, backend: Backend = "auto") -> int:
    """Make the `nn.Linear` layers of a CPU model run their float32 products through
    oneDNN (`backend` auto: where `onednn_available`; torch: leave them). Returns how
    many layers now do (0 for a model not on the CPU). Call before wrapping the model in
    DDP; not for FSDP. Subclasses of `nn.Linear` (e.g. LoRA layers) keep their own
    forward; the plain layers inside them switch."""
    if backend == "torch" or (backend == "auto" and not onednn_available()):
        return 0
    if backend == "onednn" and not onednn_available():
        raise RuntimeError(
            "model.cpu_matmul: onednn needs an x86-64 torch build with oneDNN; use auto or torch"
        )
    if any(p.device.type != "cpu" for p in model.parameters()):
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            module.weight._tropd_onednn = True
            count += 1
    return count


def use_torch_products(model: nn.Module) -> None:
    """Undo `use_onednn`: the layers compute with `F.linear` again."""
    for module in model.modules():
        if type(module) is OneDNNLinear:
            module.__class__ = nn.Linear
            module.weight._tropd_onednn = False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEEP_FREED_BYTES = 2**30


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks of up to `KEEP_FREED_BYTES` for reuse
    instead of returning them to the OS (its defaults unmap blocks over 32 MB on free and
    trim the heap top): a training step allocates and frees the same large tensors every
    step (gradients of a [V, H] embedding, logits blocks), and each fresh mapping costs a
    page fault per 4 KB page: 10-35% of a CPU step (`bench/throughput.py`). The cost is
    memory: freed blocks stay with the process, and the heap fragments, so peak RSS can
    rise above the live peak (by up to ~25% measured, vocabulary 152k). False where
    malloc is not glibc's. `model.keep_freed_memory: false` leaves malloc alone."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
    )


def fused_linear(layers: list[nn.Linear]) -> Callable[[torch.Tensor], torch.Tensor]:
    """No-grad `x -> cat([layer(x) for layer in layers], -1)` as one product, for a
    decoding loop: the weights concatenated once (and reordered for oneDNN when every
    layer is a switched one and autocast is off); the weights must not change while the
    function is in use."""
    weights = [layer.weight.detach() for layer in layers]
    weight = weights[0] if len(weights) == 1 else torch.cat(weights)  # one layer: no copy
    bias = None
    if any(layer.bias is not None for layer in layers):
        biases = [
            layer.bias.detach() if layer.bias is not None else weight.new_zeros(layer.out_features)
            for layer in layers
        ]
        bias = biases[0] if len(biases) == 1 else torch.cat(biases)
    if not (
        all(routed(layer.weight) for layer in layers)
        and _plain(bias)
        and not torch.is_autocast_enabled("cpu")
    ):
        return lambda x: F.linear(x, weight, bias)
    packed = _reorder(weight)

    def product(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        return _product(flat, packed, bias).reshape(*x.shape[:-1], -1)

    return product
