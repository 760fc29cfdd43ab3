"""`model.autocast: bf16`: the student's forward, the teacher's scoring and sampling run
their products in bfloat16 while the student's weights stay float32. On a fixed batch the
losses and gradients agree with float32 to bfloat16 precision, and really are bf16."""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext

import pytest
import torch
from conftest import guided_rollout

from tropd.config import load_config
from tropd.models import forward_precision, native_bf16
from tropd.objectives import get_objective
from tropd.teacher import score_batch
from tropd.train import loop

# bfloat16 keeps 8 significant bits: each product of two rounded inputs is off by at most
# 2 * 2^-9 = 2^-8 relative (fp32 accumulation adds nothing comparable). A model of L layers
# has 4 L + 1 products in series from embedding to logit (attention in and out, MLP in and
# out, then the head), so a logit is off by up to (4 L + 1) 2^-8 of the logits' size, and
# a log-prob (a logit minus a log-sum-exp) by twice that. Losses and gradients average such
# terms: the one-layer student's agree within 2 * 5 * 2^-8 ≈ 0.04 of their size (seen:
# ~0.0035 for the gradients, ~1e-4 for the losses).
BF16_PRODUCT = 2.0**-8
FP32 = 2.0**-23


def bound(layers: int) -> float:
    """Relative bound on a log-prob, loss or gradient computed in bf16 (see above)."""
    return 2 * (4 * layers + 1) * BF16_PRODUCT


DEVICES = [
    "cpu",
    *(["cuda"] if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else []),
]


@pytest.fixture(scope="module", params=DEVICES)
def fixed(tiny_pair, tmp_path_factory, request):
    """(setup, batch): 3 prompts x 2 rollouts, half guided, scored by the float32 teacher;
    on the CPU, and on a bf16 GPU where there is one."""
    setup, batch = guided_rollout(
        tiny_pair,
        tmp_path_factory.mktemp("run"),
        "model.dtype=float32",
        f"model.device={request.param}",
    )
    batch = batch.to(torch.device(request.param))
    batch = score_batch(setup.teacher, batch, top_k=8)
    assert bool(batch.teacher_mask.any()) and bool(batch.student_mask.any())
    return setup, batch


def loss_and_grad(setup, batch, objective, autocast: str, chunked: bool):
    student = setup.student
    student.zero_grad(set_to_none=True)
    setup.chunked_head = chunked
    with forward_precision(autocast, batch.tokens.device):
        logits = loop.student_logits(setup, student, batch)
    out = objective(logits, batch, generator=torch.Generator().manual_seed(3), step=2)
    out.loss.backward()
    grad = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    return out.loss.detach(), grad


@pytest.mark.parametrize("name", ["opd", "tropd", "fkl_outlier"])
@pytest.mark.parametrize("chunked", [True, False])
def test_bf16_losses_and_gradients_agree_with_float32(fixed, name: str, chunked: bool) -> None:
    setup, batch = fixed
    objective = get_objective(name)
    loss32, grad32 = loss_and_grad(setup, batch, objective, "none", chunked)
    loss16, grad16 = loss_and_grad(setup, batch, objective, "bf16", chunked)
    assert all(p.dtype == torch.float32 for p in setup.student.parameters())
    assert math.isfinite(float(loss16))
    relative = bound(setup.student.config.num_hidden_layers)
    assert abs(float(loss16 - loss32)) <= relative * max(abs(float(loss32)), 1.0)
    assert float((grad16 - grad32).norm()) <= relative * float(grad32.norm())
    # ... and the products really ran in bf16: further from float32 than its rounding.
    assert float((grad16 - grad32).norm()) > 1e3 * FP32 * float(grad32.norm())


def test_bf16_teacher_scores_agree_with_float32(fixed) -> None:
    setup, batch = fixed
    teacher16 = copy.deepcopy(setup.teacher).to(torch.bfloat16)
    with forward_precision("bf16", batch.tokens.device):
        scored = score_batch(teacher16, batch.replace(teacher_cache=None), top_k=8)
    response = batch.response_mask
    with torch.no_grad():
        logits = setup.teacher(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
    size = float(logits[batch.attention_mask.bool()].abs().max())
    tolerance = bound(setup.teacher.config.num_hidden_layers) * size  # seen: ~0.0015
    diff = (scored.teacher_logprobs - batch.teacher_logprobs)[response].abs().max()
    assert 0 < float(diff) <= tolerance
    entropy = (scored.teacher_entropy - batch.teacher_entropy)[response].abs().max()
    assert float(entropy) <= tolerance
    assert scored.teacher_logprobs.dtype == torch.float32


def test_a_bf16_run_trains_float32_weights_with_a_bf16_teacher(tiny_pair, tmp_path) -> None:
    teacher, student = tiny_pair
    config = load_config(
        None,
        [
            f"model.teacher={teacher}",
            f"model.student={student}",
            "model.dtype=float32",
            "model.device=cpu",
            "model.autocast=bf16",
            f"run.output_dir={tmp_path / 'run'}",
            "run.progress=false",
            "run.steps=2",
            "run.save_every=0",
            "eval.every=0",
            "objective.name=tropd",
            "teacher.top_k=8",
            "rollout.prompts_per_step=2",
            "rollout.samples_per_prompt=2",
            "rollout.max_new_tokens=6",
        ],
    )
    emulated = not native_bf16(torch.device("cpu"))  # then the run warns that it is slow
    with pytest.warns(UserWarning, match="model.autocast") if emulated else nullcontext():
        setup = loop.build(config, tmp_path / "run")
    before = [p.detach().clone() for p in setup.student.parameters()]
    record = loop.train_step(setup, 1, 0, 1)
    assert math.isfinite(record["loss"]) and not record["skipped"]
    assert next(setup.teacher.parameters()).dtype == torch.bfloat16
    after = list(setup.student.parameters())
    assert all(p.dtype == torch.float32 for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu avx512f avx512_bf16 avx512_vnni", True),
        ("fpu amx_tile amx_bf16", True),
        ("fpu avx2", False),
    ],
)
def test_bf16_hardware_is_read_from_the_cpu_flags(flags: str, native: bool) -> None:
    cpuinfo = f"processor\t: 0\nflags\t\t: {flags}\n"
    assert native_bf16(torch.device("cpu"), cpuinfo) is native
