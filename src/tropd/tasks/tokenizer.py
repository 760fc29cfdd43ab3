"""Character-level tokenizer for the built-in synthetic tasks.

Every character of the task alphabet is one token, so token counts equal string
lengths and `decode(encode(s)) == s` holds exactly, spaces and newlines included.
"""

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

# The chat template renders user and system messages as their bare text, one after
# another, and nothing else: the prompt the model sees is exactly the task prompt,
# and `add_generation_prompt` adds no text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user'] %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
)


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """Build a character-level tokenizer over `alphabet`.

    Ids: `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3, then the distinct characters
    of `alphabet` in sorted order. Encoding adds no special tokens; characters
    outside the alphabet map to `<unk>`. Padding is on the left (for batched
    generation).
    """
    chars = sorted(set(alphabet))
    if not chars:
        raise ValueError("the tokenizer alphabet is empty; pass the characters it must cover")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in chars:
        vocab[char] = len(vocab)

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # `[\s\S]` matches any single character, newlines included.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def vocab_size_for(alphabet: str) -> int:
    """The vocabulary size `build_char_tokenizer(alphabet)` produces."""
    return len(SPECIAL_TOKENS) + len(set(alphabet))
