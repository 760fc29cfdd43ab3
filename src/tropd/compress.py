"""Compression students: start a student from a subset of the teacher's decoder layers.

`prune_layers(teacher, [0, 2, 4])` returns a copy of the teacher that keeps those
layers (in that order) and everything else (embeddings, final norm, head); it is a
normal Hugging Face model, saved with `save_pretrained`. Keeping every layer gives
the teacher back exactly. Pure layer surgery on a loaded model: `tropd prune TEACHER
--layers 0,2,4 --out DIR` saves one and `model.student: prune:<teacher>:<layers>` builds
one at the start of a run (both through `tropd.model_names`).
"""

from __future__ import annotations

import copy

from torch import nn


def parse_layers(text: str) -> list[int]:
    """`"0,2,4"`, `"0-3,8"` (ranges inclusive) -> `[0, 2, 4]`, `[0, 1, 2, 3, 8]`."""
    layers: list[int] = []
    try:
        for part in text.split(","):
            first, sep, last = part.strip().partition("-")
            layers += range(int(first), int(last) + 1) if sep else [int(first)]
    except ValueError:
        raise ValueError(
            f"bad layer list {text!r}; write indices and ranges like 0,2,4 or 0-5,10"
        ) from None
    if not layers:
        raise ValueError("the layer list is empty; name at least one layer")
    return layers


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (`model.model.layers` for Llama-like models)."""
    count = model.config.get_text_config().num_hidden_layers
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for module in (decoder, *decoder.children()):
        for child in module.children():
            if isinstance(child, nn.ModuleList) and len(child) == count:
                return child
    raise ValueError(
        f"cannot find the {count} decoder layers of {type(model).__name__}; "
        "layer pruning supports decoder-only models with a layer list (Llama, Qwen, ...)"
    )


def prune_layers(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of `teacher` with only decoder `layers` (indices into the teacher's), in order.

    Each kept layer's `layer_idx` (its slot in the KV cache) is renumbered, and the
    config's `num_hidden_layers` (and `layer_types`, when the model has per-layer
    attention types) follow the kept layers. The teacher is not changed.
    """
    blocks = decoder_layers(teacher)
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(
            f"layers {layers} must be distinct indices in 0..{len(blocks) - 1} "
            f"(the teacher has {len(blocks)} layers)"
        )
    student = copy.deepcopy(teacher)
    kept = nn.ModuleList(decoder_layers(student)[i] for i in layers)
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    parent = student.get_decoder() if hasattr(student, "get_decoder") else student
    for name, child in list(parent.named_children()):
        if isinstance(child, nn.ModuleList) and len(child) == len(blocks):
            setattr(parent, name, kept)
    config = student.config.get_text_config()
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in layers]
    config.num_hidden_layers = len(layers)
    return student
