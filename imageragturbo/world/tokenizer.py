"""A word-level tokenizer over the shapes world's vocabulary, in transformers' format.

Every caption of the grammar is a sequence of known words, so a word-level model is exact
and tiny. The tokenizer lowercases, splits on whitespace and punctuation, maps anything
outside the vocabulary to ``<|unk|>`` (so free text never crashes), and wraps the ids in
``<|startoftext|> ... <|endoftext|>`` like CLIP's, which is where ``CLIPTextModel`` reads its
pooled output. Save it with ``save_pretrained(dir)``; ``AutoTokenizer.from_pretrained(dir,
local_files_only=True)`` loads it back.
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from imageragturbo.world.spec import VOCABULARY

PAD = "<|pad|>"
UNK = "<|unk|>"
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS)
# The longest caption ("a purple triangle on the left and a yellow square on the right")
# has 13 words; with BOS and EOS that is 15, rounded up.
MODEL_MAX_LENGTH = 16


def build_world_tokenizer() -> PreTrainedTokenizerFast:
    """The world tokenizer: ids 0-3 are pad, unk, bos, eos, then ``VOCABULARY`` in order.

    The eos id is 3, not 2: ``CLIPTextModel`` treats ``eos_token_id == 2`` as a legacy
    config and pools at the largest id instead of at the end-of-text token.
    """
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *VOCABULARY))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )
