"""Words outside the model's vocabulary: the tokenizer-side check (PromptChecker), and the
service naming them in every answer (or refusing them with IRT_STRICT_VOCAB=1)."""

import json

import httpx
import pytest
from serving import CAPTIONS, ServerThread, build_tiny_pipeline, bundled_model, word_level_tokenizer
from transformers import AutoTokenizer

from imageragturbo.model.text import PromptChecker, PromptEncoder
from imageragturbo.service import ServiceSettings, create_app
from imageragturbo.service.generation import WARNINGS_HEADER

BUNDLED = bundled_model()
WORDS = sorted({word for caption in CAPTIONS for word in caption.split()})
UNKNOWN = 'words outside the model\'s vocabulary (the model reads <|unk|> for each): '


@pytest.mark.skipif(BUNDLED is None, reason="the bundled model is not there")
def test_the_bundled_word_level_tokenizer_maps_unknown_words_to_unk():
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED / "tokenizer")
    assert tokenizer.unk_token == "<|unk|>" and tokenizer.backend_tokenizer.model.__class__.__name__ == "WordLevel"
    # What the model reads: every word outside the vocabulary becomes the one unk id.
    ids = tokenizer("a gigantic red circle", add_special_tokens=False).input_ids
    assert ids[1] == tokenizer.unk_token_id and ids.count(tokenizer.unk_token_id) == 1

    checker = PromptChecker(tokenizer)
    assert checker.kind == "WordLevel" and checker.max_tokens == 16
    assert checker.unknown_words("a red circle on the left and a blue square on the right") == []
    # Case is folded by the tokenizer's normaliser; punctuation is a word of its own; each once.
    assert checker.unknown_words("A RED circle, gigantic Gigantic gigantic!") == [",", "gigantic", "Gigantic", "!"]
    vocabulary = checker.vocabulary()
    assert vocabulary[:4] == ["a", "two", "three", "red"] and len(vocabulary) == 25
    assert not any(word.startswith("<|") for word in vocabulary)


def test_a_byte_level_bpe_knows_every_word_and_lists_no_vocabulary():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<|endoftext|>", model_max_length=77)
    checker = PromptChecker(tokenizer)
    assert checker.unknown_words("a gigantic \u2603 circle, \u00e9t\u00e9!") == []
    assert checker.kind == "BPE" and checker.vocabulary() is None


def test_a_small_alphabet_bpe_names_only_the_words_with_unknown_characters(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    checker = PromptChecker(tokenizer, 16)
    # The tiny CLIP BPE spells a-z and 0-9 only, and its unk is <|endoftext|>: the end token a
    # prompt always gets is not counted as an unknown word.
    assert checker.unknown_words("two blue squares") == []
    assert checker.unknown_words("two blue squares, \u00e9t\u00e9") == [",", "\u00e9t\u00e9"]
    check = checker.check("a red circle on the left")
    assert check.tokens == 17 and check.truncated


def test_prompt_encoder_gives_a_checker_on_its_own_copy_of_the_tokenizer(tiny_pipe):
    encoder = tiny_pipe.encoder
    assert isinstance(encoder, PromptEncoder)
    checker = encoder.prompt_checker()
    assert checker.max_tokens == encoder.max_length
    assert checker._backend is not encoder.tokenizer.backend_tokenizer
    checker.check("two blue squares " * 30)  # no truncation setting leaks into the encoder's tokenizer
    assert encoder.tokenize(["two blue squares"]).shape == (1, encoder.max_length)


@pytest.fixture(scope="module")
def word_pipe(tiny_model_dir):
    return build_tiny_pipeline(tiny_model_dir, tokenizer=word_level_tokenizer(WORDS))


@pytest.fixture(scope="module")
def server(word_pipe):
    with ServerThread(create_app(word_pipe, ServiceSettings(), model_name="words")) as running:
        yield running


def test_every_answer_names_the_unknown_words(server):
    prompt = "a gigantic red circle, wow"
    expected = UNKNOWN + '"gigantic", ",", "wow"'
    png = httpx.post(f"{server.url}/generate", json={"prompt": prompt, "seed": 1})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers[WARNINGS_HEADER] == expected
    single = httpx.post(f"{server.url}/generate", json={"prompt": prompt, "seed": 1}, headers={"Accept": "application/json"})
    assert single.json()["warnings"] == [expected] and single.headers[WARNINGS_HEADER] == expected
    several = httpx.post(f"{server.url}/generate", json={"prompt": prompt, "n": 2})
    assert several.json()["warnings"] == [expected]
    openai_shaped = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": prompt})
    assert openai_shaped.json()["warnings"] == [expected] and openai_shaped.headers[WARNINGS_HEADER] == expected


def test_known_prompts_get_no_warnings_and_the_old_answers(server):
    png = httpx.post(f"{server.url}/generate", json={"prompt": "two blue squares", "seed": 1})
    assert WARNINGS_HEADER.lower() not in png.headers
    body = httpx.post(f"{server.url}/generate", json={"prompt": "Two Blue squares", "seed": 1},
                      headers={"Accept": "application/json"}).json()
    assert set(body) == {"image", "seed", "mode", "timings_ms", "neighbors"}
    assert httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "two blue squares"}).json()["warnings"] == []


def test_non_ascii_unknown_words_are_escaped_in_the_header(server):
    response = httpx.post(f"{server.url}/generate", json={"prompt": "a red \u2603 circle\u0000"})
    assert response.status_code == 200
    header = response.headers[WARNINGS_HEADER]
    assert header.isascii() and "\\u2603" in header and "\\u0000" in header
    words = json.loads("[" + header.removeprefix(UNKNOWN) + "]")
    assert words == ["\u2603", "\u0000"]


def test_info_lists_the_vocabulary_of_a_word_level_tokenizer(server):
    info = httpx.get(f"{server.url}/info").json()
    assert info["tokenizer"] == "WordLevel" and info["unk_token"] == "<|unk|>"
    assert info["vocabulary"] == WORDS


def test_strict_vocab_refuses_unknown_words_with_422_naming_them(word_pipe, monkeypatch):
    monkeypatch.setenv("IRT_STRICT_VOCAB", "1")
    settings = ServiceSettings()
    assert settings.strict_vocab
    with ServerThread(create_app(word_pipe, settings, model_name="words")) as running:
        refused = httpx.post(f"{running.url}/generate", json={"prompt": "a gigantic red circle"})
        assert refused.status_code == 422
        assert refused.json()["detail"].startswith(
            "prompt: words outside the model's vocabulary: \"gigantic\" (IRT_STRICT_VOCAB=1 refuses them"
        )
        openai_shaped = httpx.post(f"{running.url}/v1/images/generations", json={"prompt": "a red circle wow"})
        assert openai_shaped.status_code == 422
        assert openai_shaped.json()["error"]["param"] == "prompt" and '"wow"' in openai_shaped.json()["error"]["message"]
        assert httpx.post(f"{running.url}/generate", json={"prompt": "a red circle"}).status_code == 200
