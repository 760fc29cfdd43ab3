import string

import pytest
from transformers import AutoTokenizer

from tropd.tasks.tokenizer import SPECIAL_TOKENS, build_char_tokenizer, vocab_size_for

ALPHABET = string.digits + string.ascii_lowercase + "+=: \n"


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(ALPHABET)


@pytest.mark.parametrize(
    "text",
    ["57+384=441", "a b", "  two  spaces ", "line one\nline two\n", "\n\n", "", ALPHABET],
)
def test_decode_inverts_encode_exactly(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)  # one token per character
    assert tokenizer.decode(ids) == text


def test_special_token_ids_and_padding_side(tokenizer):
    assert tokenizer.pad_token_id == 0
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tokenizer.eos_token == "<eos>" and tokenizer.bos_token == "<bos>"
    assert len(tokenizer) == vocab_size_for(ALPHABET) == len(SPECIAL_TOKENS) + len(set(ALPHABET))
    batch = tokenizer(["1", "123"], padding=True, add_special_tokens=False)
    assert batch["input_ids"][0][:2] == [0, 0]
    assert batch["attention_mask"][0] == [0, 0, 1]


def test_unknown_character_maps_to_unk(tokenizer):
    assert tokenizer.encode("1X2", add_special_tokens=False)[1] == tokenizer.unk_token_id


def test_decode_skips_eos_when_asked(tokenizer):
    ids = [*tokenizer.encode("441", add_special_tokens=False), tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "441"
    assert tokenizer.decode(ids) == "441<eos>"


def test_chat_template_renders_the_exact_prompt(tokenizer):
    messages = [{"role": "user", "content": "57+384="}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "57+384="
    with_system = [{"role": "system", "content": "add:"}, *messages]
    assert tokenizer.apply_chat_template(with_system, tokenize=False) == "add:57+384="
    with_reply = [*messages, {"role": "assistant", "content": "441"}]
    assert tokenizer.apply_chat_template(with_reply, tokenize=False) == "57+384="


def test_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "copy:ab c=\nab c"
    assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(
        text, add_special_tokens=False
    )
    assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded.padding_side == "left"
    rendered = loaded.apply_chat_template(
        [{"role": "user", "content": "7+8="}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "7+8="


def test_empty_alphabet_is_rejected():
    with pytest.raises(ValueError, match="alphabet is empty"):
        build_char_tokenizer("")
