"""Trainable bridge from Qwen2.5-VL hidden states to FLUX's text inputs."""

from __future__ import annotations

import torch
from torch import nn


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the valid tokens of (B, L, D) states; mask (B, L) is True where a token is real."""
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class Connector(nn.Module):
    """Qwen states (B, L, qwen_dim) -> encoder_hidden_states (B, L, joint_dim) and pooled (B, pooled_dim).

    The token path is an MLP (qwen_dim -> hidden_dim -> joint_dim). The pooled
    vector, which FLUX feeds into its timestep modulation, is a learned
    projection of the masked mean of the Qwen states, so it depends on the
    actual instruction and image (not a CLIP embedding of an empty prompt).
    """

    def __init__(self, qwen_dim: int, joint_dim: int, pooled_dim: int, hidden_dim: int | None = None,
                 refiner_layers: int = 0, refiner_heads: int = 8):
        super().__init__()
        hidden_dim = hidden_dim or joint_dim
        self.sizes = {"qwen_dim": qwen_dim, "joint_dim": joint_dim, "pooled_dim": pooled_dim, "hidden_dim": hidden_dim,
                      "refiner_layers": refiner_layers, "refiner_heads": refiner_heads}
        self.norm = nn.LayerNorm(qwen_dim)  # last-layer LLM states have large, uneven scales
        self.mlp = nn.Sequential(nn.Linear(qwen_dim, hidden_dim), nn.GELU(approximate="tanh"), nn.Linear(hidden_dim, joint_dim))
        self.pooled = nn.Sequential(nn.Linear(qwen_dim, pooled_dim), nn.SiLU(), nn.Linear(pooled_dim, pooled_dim))
        # Optional token refiner: a few pre-norm transformer layers over the connector's output tokens
        # (absent by default, so the MLP's weights keep the public reference's layout).
        self.refiner = nn.ModuleList(
            nn.TransformerEncoderLayer(joint_dim, refiner_heads, dim_feedforward=2 * joint_dim, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(refiner_layers)
        ) if refiner_layers else None

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.norm(states)
        keep = mask.to(states.dtype).unsqueeze(-1)
        tokens = self.mlp(states)
        for layer in self.refiner or ():
            tokens = layer(tokens, src_key_padding_mask=~mask)  # real tokens never attend to padding
        return tokens * keep, self.pooled(masked_mean(states, mask))  # padding carries exact zeros
