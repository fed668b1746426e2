"""The world tokenizer: exact on the grammar, unk on anything else, loadable by AutoTokenizer offline."""

from __future__ import annotations

from transformers import AutoTokenizer

from imageragturbo.world.spec import all_specs, caption
from imageragturbo.world.tokenizer import MODEL_MAX_LENGTH, build_world_tokenizer


def test_every_caption_tokenizes_without_unk_and_fits():
    tok = build_world_tokenizer()
    longest = 0
    for spec in all_specs():
        ids = tok(caption(spec)).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in ids
        longest = max(longest, len(ids))
    assert longest == 15 <= MODEL_MAX_LENGTH


def test_round_trip_through_save_pretrained(tmp_path):
    build_world_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert tok.model_max_length == MODEL_MAX_LENGTH
    batch = tok(["A Red circle, on the LEFT!", ""], padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True)
    ids = batch.input_ids
    assert len(ids[0]) == len(ids[1]) == MODEL_MAX_LENGTH
    words = tok.convert_ids_to_tokens(ids[0][:10])
    # Lowercased; the comma and the bang are outside the vocabulary and become unk.
    assert words == ["<|startoftext|>", "a", "red", "circle", "<|unk|>", "on", "the", "left", "<|unk|>", "<|endoftext|>"]
    assert ids[1][:3] == [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    # Free text far longer than any caption is truncated, not an error.
    assert len(tok("zebra " * 40, truncation=True, max_length=MODEL_MAX_LENGTH).input_ids) == MODEL_MAX_LENGTH
