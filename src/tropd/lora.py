"""LoRA on the student (via `peft`) and merging it back for export.

The adapters are injected into the model in place (`peft.inject_adapter_in_model`), so
the student stays the same Hugging Face class: rollouts, teacher-style hidden-state
access and checkpoints work unchanged, and only the adapter weights require grad.
`merge_lora` folds `B @ A * alpha / rank` into each base weight and removes the adapter
modules, leaving a plain model that `save_pretrained` writes in the usual format.
"""

from __future__ import annotations

from torch import nn


def _peft():
    try:
        import peft
    except ImportError:
        raise ValueError(
            "lora.enabled needs peft; install it with pip install 'tropd[lora]'"
        ) from None
    return peft


def apply_lora(
    model: nn.Module,
    rank: int = 16,
    alpha: float = 32.0,
    target_modules: list[str] | str = "all-linear",
    dropout: float = 0.0,
) -> nn.Module:
    """Add LoRA adapters to `model` in place; freeze everything else. Returns `model`.

    `target_modules`: module-name suffixes (e.g. `["q_proj", "v_proj"]`) or
    `"all-linear"` (every linear layer but the output head).
    """
    peft = _peft()
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules,
        lora_dropout=dropout,
        task_type="CAUSAL_LM",
    )
    try:
        model = peft.inject_adapter_in_model(config, model)
    except ValueError as err:
        raise ValueError(f"lora.target_modules: {str(err).splitlines()[0]}") from None
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and drop the adapter modules (in place).

    The merged model computes what the adapted one did (up to float rounding) and has
    the original architecture and parameter names. Returns `model`.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    model.requires_grad_(True)
    return model
