"""The offline byte-level BPE tokenizer and the built-in corpus."""

import pytest

from processing.tokenizer import SPECIAL_TOKENS, builtin_corpus, set_bpe_dropout, train_text_tokenizer

TEXTS = [
    "Return the number of items in a container.",
    "Open a file and return a stream. Raise OSError upon failure.",
    "Split the string at the last occurrence of sep, and return a 3-tuple.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_text_tokenizer(TEXTS, vocab_size=300)


def test_roundtrip_is_lossless_on_unseen_unicode(tokenizer):
    text = "Naïve café — 東京 ✓ tabs\tand\nnewlines"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids_and_padding_is_left(tokenizer):
    for token in SPECIAL_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert tokenizer.image_token == "<image>" and tokenizer.audio_token == "<audio>"
    batch = tokenizer(["a", "Return the number"], padding=True)
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id
    assert batch["attention_mask"][0][0] == 0


def test_chat_template_handles_string_and_typed_content(tokenizer):
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "red"},
    ]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\n<image>What colour?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_save_and_reload_with_autotokenizer(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Split the string at sep."
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.chat_template == tokenizer.chat_template
    assert again.padding_side == "left" and again.image_token == "<image>"


def test_bpe_dropout_changes_segmentation_only_when_enabled():
    tok = train_text_tokenizer(TEXTS, vocab_size=300, dropout=0.5)
    text = "Return the number of items in a container."
    segmentations = {tuple(tok(text)["input_ids"]) for _ in range(20)}
    assert len(segmentations) > 1
    assert all(tok.decode(list(s)) == text for s in segmentations)
    set_bpe_dropout(tok, None)
    assert len({tuple(tok(text)["input_ids"]) for _ in range(5)}) == 1


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        train_text_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(ValueError, match="dropout"):
        train_text_tokenizer(TEXTS, vocab_size=300, dropout=1.5)


def test_builtin_corpus_is_real_deterministic_prose():
    docs = builtin_corpus(max_docs=200)
    assert len(docs) == 200
    assert docs == builtin_corpus(max_docs=200)
    assert len(set(docs)) == len(docs) and all(len(d) >= 80 for d in docs)
    assert sum(len(d) for d in builtin_corpus()) > 300_000
