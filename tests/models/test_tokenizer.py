import pytest

from tpo.models.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN
from tpo.registry import build_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return build_tokenizer(dict(type="TinyTokenizer", vocab_size=400))


def test_tiny_tokenizer_round_trips_any_text(tiny):
    text = "What colour is the circle? Ünïcode ☃ 12.5%"
    assert tiny.decode(tiny(text).input_ids) == text


def test_media_tokens_are_single_special_tokens(tiny):
    ids = tiny(f"{IMAGE_TOKEN}{IMAGE_TOKEN}{VIDEO_TOKEN}", add_special_tokens=False).input_ids
    assert ids == tiny.convert_tokens_to_ids([IMAGE_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN])
    assert len(set(ids)) == 2 and tiny.unk_token_id not in ids


def test_chat_template(tiny):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]
    text = tiny.apply_chat_template(messages, tokenize=False)
    assert text == "<s><|user|>\nhi\n<|assistant|>\nred</s>\n"
    prompt = tiny.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")


def test_tiny_tokenizer_is_deterministic_and_saves(tiny, tmp_path):
    again = build_tokenizer(dict(type="TinyTokenizer", vocab_size=400))
    assert again.get_vocab() == tiny.get_vocab()
    tiny.save_pretrained(tmp_path)
    loaded = build_tokenizer(dict(type="PretrainedTokenizer", pretrained=str(tmp_path)))
    text = f"{IMAGE_TOKEN}\nhow many squares?"
    assert loaded(text).input_ids == tiny(text).input_ids
    assert loaded.chat_template == tiny.chat_template


def test_pretrained_tokenizer_gets_media_tokens_and_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path)
    tok = build_tokenizer(dict(type="PretrainedTokenizer", pretrained=str(tmp_path)))
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) != tok.unk_token_id
    assert tok.pad_token == "</s>" and tok.chat_template


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="tokenizer.vocab_size"):
        build_tokenizer(dict(type="TinyTokenizer", vocab_size=100))
