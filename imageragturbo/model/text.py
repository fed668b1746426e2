"""Prompt encoding: the cross-attention context and the retrieval query from one encoder pass."""

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
