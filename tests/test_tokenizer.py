"""The offline tokenizer is tiktoken's GPT-2 encoding."""

import hashlib

import pytest

from gpt2.tokenizer import EOT_ID, RANKS_PATH, RANKS_SHA256, _load_ranks, get_encoding


def test_known_ids():
    enc = get_encoding()
    assert enc.encode_ordinary("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.n_vocab == 50257 and enc.eot_token == EOT_ID == 50256


@pytest.mark.parametrize(
    "text",
    [
        "",
        "naïve café — 東京 🤖 Ελληνικά\n\tтекст",
        "a  b   \n\n  c",
        "x" * 5000,
        "\u200b\ufeff\U0010ffff",
        "''s 've ll",
    ],
)
def test_decode_round_trips_unicode(text):
    enc = get_encoding()
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_literal_eot_is_ordinary_text():
    enc = get_encoding()
    ids = enc.encode_ordinary("a<|endoftext|>b")
    assert EOT_ID not in ids
    assert enc.decode(ids) == "a<|endoftext|>b"
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_ID]


def test_vendored_ranks_match_their_checksum(tmp_path):
    assert hashlib.sha256(RANKS_PATH.read_bytes()).hexdigest() == RANKS_SHA256
    corrupt = tmp_path / "gpt2.tiktoken"
    corrupt.write_bytes(RANKS_PATH.read_bytes()[:-10])
    with pytest.raises(RuntimeError, match="corrupt"):
        _load_ranks(corrupt)


def test_vendored_ranks_equal_the_shared_copy(shared_data):
    assert (shared_data / "gpt2.tiktoken").read_bytes() == RANKS_PATH.read_bytes()
