"""The method registry: each method is declared beside its rule with `@register` (or derived
from another with `preset`), and `resolve_options` checks a method's options.

A rule takes `(student_logits [B, T, V], batch, options)` and, keyword-only, what else it
reads and nothing more: `generator` (the source of randomness, for the hard trust gate)
and `step` (the 1-based optimizer step, None when the caller does not say). It returns a
`MethodResult`: `(token_loss [B, T], trained_mask [B, T] bool, metrics)`, `metrics`
mapping names to `(values [B, T], mask [B, T])` pairs that the objective averages.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

MethodResult = tuple[torch.Tensor, torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]
Rule = Callable[..., MethodResult]

LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_sum")
COMMON_DEFAULTS = {"loss_agg": "token_mean"}  # every method takes these options
CONTEXT = ("generator", "step")  # what a rule may read besides the logits, batch and options


class OptionError(ValueError):
    """A bad option of a known method; `option` is its name."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


def always(options: dict[str, Any]) -> bool:
    return True


def never(options: dict[str, Any]) -> bool:
    return False


@dataclass(frozen=True)
class Method:
    """A registry entry: the rule, its options with defaults, and what it needs."""

    rule: Rule
    defaults: dict[str, Any]
    summary: str
    paper: str
    # Teacher prefixes by default, with these `guidance.*` settings where the config leaves
    # them null (`tropd.config.GUIDANCE_DEFAULTS` for the rest); None: no prefixes.
    guidance: dict[str, Any] | None = None
    trains_prefix: bool = False  # whether teacher-prefix tokens are trained (and counted)
    needs_reward: bool = False  # whether the loop must fill `batch.reward` with the verifier
    choices: dict[str, tuple] = field(default_factory=dict)  # besides `loss_agg` (all methods)
    trains_student: bool = True  # whether student tokens are trained (and counted)
    rollout: str = "student"  # "blend": rollouts come from `tropd.rollout.blend.BlendEngine`
    checks: dict[str, tuple[Callable[[Any], bool], str]] = field(default_factory=dict)
    # Whether the rule reads the student only through `token_logprobs` and `entropy`, so
    # the loop may pass a `HeadLogits` (chunked LM head) instead of `[B, T, V]` logits.
    chunked_head: bool = True
    # Whether the rule reads the teacher's top-k (`teacher_topk_*`), given the options,
    # and its entropy: scoring skips what no one reads.
    teacher_topk: Callable[[dict[str, Any]], bool] = always
    teacher_entropy: bool = False
    reads: tuple[str, ...] = ()  # which of `CONTEXT` the rule takes (from its signature)
    # Deprecated option spellings -> the current names: accepted with a DeprecationWarning.
    aliases: dict[str, str] = field(default_factory=dict)


REGISTRY: dict[str, Method] = {}


def register(name: str, *, defaults: dict[str, Any], summary: str, paper: str, **needs: Any):
    """Decorator: register the rule below it as method `name`. `defaults` are its options
    (`loss_agg` is added); `needs` sets the other `Method` fields."""

    def add(rule: Rule) -> Rule:
        reads = tuple(p for p in inspect.signature(rule).parameters if p in CONTEXT)
        REGISTRY[name] = Method(
            rule, {**defaults, **COMMON_DEFAULTS}, summary, paper, reads=reads, **needs
        )
        return rule

    return add


def preset(name: str, base: str, summary: str, options: dict[str, Any], **needs: Any) -> None:
    """Register `name` as method `base` with other default `options` and `needs` (fields
    of `Method`): the same rule and declaration otherwise."""
    method = REGISTRY[base]
    defaults = {**method.defaults, **options}
    REGISTRY[name] = dataclasses.replace(method, defaults=defaults, summary=summary, **needs)


def resolve_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` over method `name`'s defaults, checked: an unknown name raises ValueError,
    an unknown option or a bad value `OptionError` (one line listing what is valid)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(sorted(REGISTRY))}")
    method = REGISTRY[name]
    options = _renamed(name, method.aliases, options)
    unknown = sorted(set(options) - set(method.defaults))
    if unknown:
        raise OptionError(
            f"objective {name!r} has no option {', '.join(unknown)}; "
            f"valid: {', '.join(sorted(method.defaults))}",
            unknown[0],
        )
    resolved = {**method.defaults, **options}
    for key, allowed in {"loss_agg": LOSS_AGGS, **method.choices}.items():
        if resolved[key] not in allowed:
            message = f"{name}.{key}={resolved[key]!r} is not one of {', '.join(allowed)}"
            raise OptionError(message, key)
    for key, (ok, why) in {**CHECKS, **method.checks}.items():
        if key in resolved and not _check(ok, resolved[key]):
            raise OptionError(f"{name}.{key}={resolved[key]!r} {why}", key)
    return resolved


def _renamed(name: str, aliases: dict[str, str], options: dict[str, Any]) -> dict[str, Any]:
    """`options` with deprecated spellings replaced by the current option names."""
    options = dict(options)
    for old, new in aliases.items():
        if old not in options:
            continue
        if new in options:
            raise OptionError(f"{name}: give {new} only ({old} is its deprecated spelling)", new)
        warnings.warn(
            f"objective option {name}.{old} is deprecated and will be removed in tropd 0.2; "
            f"use {name}.{new} (same meaning)",
            DeprecationWarning,
            stacklevel=4,
        )
        options[new] = options.pop(old)
    return options


def _integer(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check(ok: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(ok(value))
    except TypeError:
        return False


# Option checks shared by every method that has the option (`Method.checks` adds more).
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "beta": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "jsd_beta": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "ppo_clip": (
        lambda v: v is None or 0 < v < 1,
        "must be null (off) or in (0, 1)",
    ),
    "logprob_floor": (lambda v: v < 0, "must be negative (a log-probability)"),
    "gamma": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "kl_coef": (lambda v: v > 0, "must be positive"),
    "tau": (lambda v: v <= 0, "must be <= 0 (a log-ratio threshold)"),
    "rho": (lambda v: 0 < v <= 1, "must be in (0, 1] (a fraction of tokens)"),
    "entropy_keep": (lambda v: 0 < v <= 1, "must be in (0, 1] (a fraction of tokens)"),
    "entropy_threshold": (lambda v: v >= 0, "must be >= 0 (nats)"),
    "fkl_coef": (lambda v: v >= 0, "must be >= 0"),
    "top_k": (lambda v: v is None or _integer(v, 1), "must be null (all) or an integer >= 1"),
    "clip_lambda": (
        lambda v: 0 < v <= 0.5,
        "must be in (0, 0.5] (so the clip log(λ/(1−λ)) is <= 0)",
    ),
    "switch_step": (lambda v: _integer(v, 0), "must be an integer >= 0 (a step)"),
    "chunk_size": (lambda v: _integer(v, 1), "must be an integer >= 1 (positions per chunk)"),
    "alpha": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "kl_budget": (lambda v: v >= 0, "must be >= 0 (nats per token)"),
    "warmup_steps": (lambda v: _integer(v, 1), "must be an integer >= 1 (steps)"),
    "student_top_k": (lambda v: _integer(v, 1), "must be an integer >= 1"),
    "scale_rewards": (lambda v: isinstance(v, bool), "must be true or false"),
}
