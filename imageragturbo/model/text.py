"""Prompt encoding: the cross-attention context and the retrieval query from one encoder pass;
and the check of a prompt's words against the tokenizer (:class:`PromptChecker`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class EncodedPrompts:
    ctx: torch.Tensor
    """float [B, L, D]: the text encoder's last hidden state, the UNet's cross-attention context."""
    q: torch.Tensor
    """float32 [B, Dq]: the pooled text feature, L2-normalised; the retrieval query."""


class PromptEncoder:
    """Tokenize and encode prompts with the model's own text encoder.

    The paper reuses the diffusion model's text features for retrieval (no second encoder), so
    the query is the encoder's own pooled output: ``text_embeds`` for a
    ``CLIPTextModelWithProjection``, else ``pooler_output`` (the final-layer-normed hidden state
    at the end-of-text token). Prompts are padded to the tokenizer's full length so a prompt
    encodes the same alone or in a batch.
    """

    def __init__(self, tokenizer, text_encoder: torch.nn.Module):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = int(getattr(tokenizer, "model_max_length", 77))
        positions = getattr(text_encoder.config, "max_position_embeddings", self.max_length)
        self.max_length = min(self.max_length, int(positions))

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """int64 [B, L] token ids, padded and truncated to the encoder's length."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return tokens.input_ids

    def prompt_checker(self) -> PromptChecker:
        """A :class:`PromptChecker` on a copy of this encoder's tokenizer (for another thread)."""
        return PromptChecker(self.tokenizer, self.max_length)

    @torch.inference_mode()
    def __call__(self, prompts: list[str]) -> EncodedPrompts:
        device = next(self.text_encoder.parameters()).device
        return self.encode_ids(self.tokenize(prompts).to(device))

    def encode_ids(self, input_ids: torch.Tensor) -> EncodedPrompts:
        """int64 [B, L] token ids -> EncodedPrompts (traceable: the exported text_encoder graph)."""
        out = self.text_encoder(input_ids=input_ids)
        pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
        q = F.normalize(pooled.float(), dim=-1)
        return EncodedPrompts(ctx=out.last_hidden_state, q=q)


@dataclass
class PromptCheck:
    """What the tokenizer makes of one prompt."""

    unknown_words: list[str]
    """Words (as typed) with a token the tokenizer maps to its unk token, in prompt order, once each."""
    tokens: int
    """Token count with the special tokens, before truncation."""
    max_tokens: int
    """What the text encoder reads; tokens past it are cut off."""

    @property
    def truncated(self) -> bool:
        return self.tokens > self.max_tokens


class PromptChecker:
    """Finds the words of a prompt that the model's tokenizer does not know.

    A word is unknown when one of its tokens is the tokenizer's unk token: a word-level
    tokenizer (the bundled shapes model's) maps every word outside its vocabulary to
    ``<|unk|>``; a byte-level BPE (CLIP's) spells any text from its byte alphabet and so knows
    every word; a BPE over a smaller alphabet maps only the characters it lacks to unk. Words
    are the tokenizer's own pre-tokenized words (its ``word_ids``), so punctuation the
    pre-tokenizer splits off is a word of its own.

    The checker works on its own copy of the tokenizer: calling a Hugging Face tokenizer with
    padding or truncation arguments re-configures its Rust backend, so one tokenizer object must
    not be used from the worker thread (which encodes prompts) and the HTTP thread at once.
    """

    def __init__(self, tokenizer, max_tokens: int | None = None):
        self.max_tokens = int(max_tokens if max_tokens is not None else getattr(tokenizer, "model_max_length", 77))
        self.unk_token = getattr(tokenizer, "unk_token", None)
        self.unk_id = getattr(tokenizer, "unk_token_id", None)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None
        self._slow = None
        if backend is not None:
            import tokenizers

            self._backend = tokenizers.Tokenizer.from_str(backend.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()
        else:
            import copy

            self._slow = copy.deepcopy(tokenizer)
        self.kind = type(self._backend.model).__name__ if self._backend is not None else type(tokenizer).__name__

    def check(self, prompt: str) -> PromptCheck:
        if self._backend is not None:
            encoding = self._backend.encode(prompt, add_special_tokens=True)
            return PromptCheck(self._unknown_from_encoding(prompt, encoding), len(encoding.ids), self.max_tokens)
        return self._check_slow(prompt)

    def unknown_words(self, prompt: str) -> list[str]:
        return self.check(prompt).unknown_words

    def _unknown_from_encoding(self, prompt: str, encoding) -> list[str]:
        if self.unk_id is None:
            return []
        spans: dict[int, list[int]] = {}
        unknown: list[int] = []
        for token_id, word, (start, end), special in zip(
            encoding.ids, encoding.word_ids, encoding.offsets, encoding.special_tokens_mask
        ):
            if word is None or special:
                continue
            span = spans.setdefault(word, [start, end])
            span[0], span[1] = min(span[0], start), max(span[1], end)
            if token_id == self.unk_id and word not in unknown:
                unknown.append(word)
        return _once([prompt[spans[word][0] : spans[word][1]] for word in unknown])

    def _check_slow(self, prompt: str) -> PromptCheck:
        """A tokenizer without a Rust backend: look at each whitespace-separated word alone."""
        unknown = []
        if self.unk_id is not None:
            for word in prompt.split():
                if self.unk_id in self._slow(word, add_special_tokens=False).input_ids:
                    unknown.append(word)
        tokens = len(self._slow(prompt).input_ids)
        return PromptCheck(_once(unknown), tokens, self.max_tokens)

    def vocabulary(self) -> list[str] | None:
        """The words a word-level tokenizer knows, in id order, without its special tokens; None
        for a subword tokenizer (whose vocabulary is pieces, not words)."""
        if self._backend is None or self.kind != "WordLevel":
            return None
        special = {token.content for token in self._backend.get_added_tokens_decoder().values() if token.special}
        vocab = self._backend.get_vocab(with_added_tokens=False)
        return [word for word, _ in sorted(vocab.items(), key=lambda item: item[1]) if word not in special]


def _once(words: list[str]) -> list[str]:
    return list(dict.fromkeys(words))
