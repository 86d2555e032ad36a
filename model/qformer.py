"""The Q-Former building block: learned queries that read a variable-length, masked memory.

The transformer itself is transformers' ``Blip2QFormerModel`` (self-attention among the queries,
cross-attention into the memory, BERT-style layers). This wrapper owns the learned query
tokens and one learned *null* memory token that is always visible: a window with no frames,
a clip with no face or no audio still yields defined outputs instead of a softmax over nothing
(NaN), and the model can learn what "nothing here" looks like.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from model.config import QFormerConfig


class QFormer(nn.Module):
    """forward(memory, mask) -> query outputs.

    memory: (N, L, memory_dim) float; mask: (N, L) bool, True = valid (L may be 0).
    Returns (N, queries, hidden).
    """

    def __init__(self, cfg: QFormerConfig, memory_dim: int):
        super().__init__()
        self.cfg = cfg
        qcfg = Blip2QFormerConfig(
            hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
            intermediate_size=cfg.intermediate, cross_attention_frequency=cfg.cross_attention_every,
            encoder_hidden_size=memory_dim, hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout, use_qformer_text_input=False,
            # BERT's fixed 0.02 suits width 768; scaling with width keeps narrow Q-Formers from
            # passing almost nothing of their memory at initialisation (1e-5 of the signal at width 32)
            initializer_range=cfg.hidden ** -0.5,
        )
        qcfg._attn_implementation = "sdpa"
        self.qformer = Blip2QFormerModel(qcfg)
        self.query = nn.Parameter(torch.randn(1, cfg.queries, cfg.hidden) * 0.02)
        self.null = nn.Parameter(torch.randn(1, 1, memory_dim) * 0.02)

    @property
    def hidden(self) -> int:
        return self.cfg.hidden

    def forward(self, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = memory.shape[0]
        memory = torch.cat([self.null.expand(n, -1, -1).to(memory.dtype), memory], dim=1)
        mask = torch.cat([mask.new_ones(n, 1), mask], dim=1)
        out = self.qformer(query_embeds=self.query.expand(n, -1, -1), encoder_hidden_states=memory,
                           encoder_attention_mask=mask.long())
        return out.last_hidden_state
