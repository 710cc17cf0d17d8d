"""Trainable bridge from Qwen2.5-VL hidden states to FLUX's text inputs.

FLUX.1-Kontext was trained on T5 tokens (`encoder_hidden_states`) and a CLIP pooled vector (which drives
every AdaLN modulation). The connector replaces both, and starts where Kontext expects them:

- tokens: `kind=mlp` (LayerNorm -> Linear -> GELU -> Linear, optional token refiner) or `kind=reference`
  (the public GPT-Image-Edit projector: Linear(q, 3j) -> SiLU -> Linear(3j, j), no norm; its weights load
  from that code's checkpoints). `calibrate_` scales the last layer once, on real states, so the output
  tokens start at T5's RMS instead of the random layer's;
- pooled: the base's CLIP pooled embedding of the empty prompt (`pooled_base`, a buffer stored with the
  connector, what the public reference feeds constantly) plus a learned correction from the masked mean of
  the states whose last layer starts at zero: at step 0 every modulation is the one Kontext knows.
  `hold_pooled_` keeps it there for good (model.connector.pooled=base, as the reference does).
"""

from __future__ import annotations

import torch
from torch import nn

CONNECTOR_KINDS = ("mlp", "reference")
# model.connector.pooled: learned (CLIP's "" plus a correction that trains) | base (held at CLIP's "")
POOLED_MODES = ("learned", "base")


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the valid tokens of (B, L, D) states; mask (B, L) is True where a token is real."""
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _refiner_layer(dim: int, heads: int) -> nn.TransformerEncoderLayer:
    """A pre-norm transformer layer whose residual branches start at zero: the refiner begins as the identity,
    so calibrating the MLP calibrates the connector's output exactly."""
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
    for linear in (layer.self_attn.out_proj, layer.linear2):
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    return layer


class Connector(nn.Module):
    """Qwen states (B, L, qwen_dim) -> encoder_hidden_states (B, L, joint_dim) and pooled (B, pooled_dim)."""

    def __init__(self, qwen_dim: int, joint_dim: int, pooled_dim: int, kind: str = "mlp",
                 hidden_dim: int | None = None, refiner_layers: int = 0, refiner_heads: int = 8):
        super().__init__()
        if kind not in CONNECTOR_KINDS:
            raise ValueError(f"model.connector.kind: expected one of {CONNECTOR_KINDS}, got {kind!r}")
        if kind == "reference":
            hidden_dim = 3 * joint_dim  # the reference's `output_hidden_size * 3`
            self.norm, act = nn.Identity(), nn.SiLU()
        else:
            hidden_dim = hidden_dim or joint_dim
            self.norm, act = nn.LayerNorm(qwen_dim), nn.GELU(approximate="tanh")  # LLM states: uneven scales
        self.sizes = {"kind": kind, "qwen_dim": qwen_dim, "joint_dim": joint_dim, "pooled_dim": pooled_dim,
                      "hidden_dim": hidden_dim, "refiner_layers": refiner_layers, "refiner_heads": refiner_heads}
        self.mlp = nn.Sequential(nn.Linear(qwen_dim, hidden_dim), act, nn.Linear(hidden_dim, joint_dim))
        self.refiner = nn.ModuleList(_refiner_layer(joint_dim, refiner_heads)
                                     for _ in range(refiner_layers)) if refiner_layers else None
        self.register_buffer("pooled_base", torch.zeros(pooled_dim))
        self.pooled_correction = nn.Sequential(nn.LayerNorm(qwen_dim), nn.Linear(qwen_dim, pooled_dim), nn.SiLU(),
                                               nn.Linear(pooled_dim, pooled_dim))
        nn.init.zeros_(self.pooled_correction[-1].weight)
        nn.init.zeros_(self.pooled_correction[-1].bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.mlp[0].weight.dtype

    def tokens(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = self.mlp(self.norm(states))
        for layer in self.refiner or ():
            tokens = layer(tokens, src_key_padding_mask=~mask)  # real tokens never attend to padding
        return tokens * mask.to(tokens.dtype).unsqueeze(-1)  # padding carries exact zeros

    def hold_pooled_(self) -> bool:
        """Zero and freeze the pooled correction: the pooled vector is `pooled_base` from now on, in training
        and in every saved copy. Returns whether a non-zero correction (a loaded one) was dropped."""
        last = self.pooled_correction[-1]
        dropped = bool(last.weight.any() or last.bias.any())
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
        self.pooled_correction.requires_grad_(False)
        return dropped

    def pooled(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        correction = self.pooled_correction(masked_mean(states, mask))
        return self.pooled_base.to(correction.dtype) + correction

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens(states, mask), self.pooled(states, mask)

    @torch.no_grad()
    def calibrate_(self, states: torch.Tensor, mask: torch.Tensor, target_rms: float) -> float:
        """Scale the token path's last layer so the RMS of the valid output tokens of `states` is `target_rms`;
        returns the RMS before. Exact with a refiner too (its residual branches start at zero)."""
        before = float(self.tokens(states, mask)[mask].float().pow(2).mean().sqrt())
        if before > 0:
            last = self.mlp[-1]
            last.weight.mul_(target_rms / before)
            last.bias.mul_(target_rms / before)
        return before


# Public GPT-Image-Edit / UniWorld projector: `denoise_tower.denoise_projector.{0,2}.{weight,bias}` of their
# Qwen2.5-VL model (its stage-1 checkpoints save these keys, loaded there with strict=False).
REFERENCE_PROJECTOR = "denoise_projector."


def reference_projector_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The public projector's tensors renamed to ours (`mlp.0.*`, `mlp.2.*`), or None if `state` has none."""
    found = {}
    for key, tensor in state.items():
        if REFERENCE_PROJECTOR in key:
            rest = key.split(REFERENCE_PROJECTOR, 1)[1]  # "0.weight"
            found[f"mlp.{rest}"] = tensor
    return found or None
