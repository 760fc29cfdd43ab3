"""Loading primitives: a model, tokenizer or config from a path; devices and dtypes; tiny
Llama configs.

A path is a local directory saved with `save_pretrained`, a Hugging Face hub id, or a
`.gguf` file, dequantised into a regular Hugging Face model. Model *names*
(`builtin:`, `gguf:`, `prune:`, run directories, checkpoints) are resolved above, in
`tropd.model_names`.
"""

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

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
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
            "use cuda:0 or auto"
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available; use cpu or auto")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r} cannot hold a trained model; use auto, cpu or cuda")
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


def native_bf16(device: torch.device, cpuinfo: str | None = None) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware: a CUDA GPU that supports
    bf16, or a CPU whose flags (`/proc/cpuinfo`, or `cpuinfo` text) include AVX512-BF16 or
    AMX-BF16 (other accelerators are assumed to). Elsewhere torch emulates bf16 products,
    slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: unknown, assume it does
            return True
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def forward_precision(autocast: str, device: torch.device) -> AbstractContextManager:
    """The context forward passes on `device` run in for `model.autocast`: bfloat16
    autocast (`"bf16"`) or none (`"none"`). A fresh context per call."""
    if autocast == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def load_pretrained(path: str, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """The causal LM at `path` (a local directory, a hub id or a `.gguf` file) on `device`
    in `dtype`; OSError when there is none. Train/eval mode is left as `from_pretrained`
    sets it (eval)."""
    file = Path(path)
    if file.suffix != ".gguf":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype)
    # The weights are dequantised already: drop the GGUF marker so the model (and a
    # student pruned or trained from it) saves as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.to(device)


def load_pretrained_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer at `path` (a local directory, a hub id or a `.gguf` file) with a pad
    token (falling back to EOS) that pads on the left; OSError when there is none."""
    file = Path(path)
    if file.suffix == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def read_config_vocab_size(path: str) -> int:
    """The vocabulary size in the config at `path` (a local directory, a hub id or a
    `.gguf` file's metadata); no weights are read. OSError when there is no config."""
    return _read_text_config(path).vocab_size


def read_config_positions(path: str) -> int | None:
    """`max_position_embeddings` in the config at `path` (None where it sets none), read
    like `read_config_vocab_size`."""
    return getattr(_read_text_config(path), "max_position_embeddings", None)


def _read_text_config(path: str) -> PretrainedConfig:
    file = Path(path)
    if file.suffix == ".gguf":
        return AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
    return AutoConfig.from_pretrained(path).get_text_config()
