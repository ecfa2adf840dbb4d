"""The CLIP text transformer SD3 uses twice: CLIP-L (ViT-L/14) and CLIP-G (OpenCLIP bigG/14).

The numerics of transformers' `CLIPTextModelWithProjection` (docs/numerics.md §8.1; Radford et al. 2021, §2.4),
and the two things SD3 takes from it (`CLIPOutput`, docs/numerics.md §7): the sequence entering the last layer,
and the final-normed end-of-text state through `text_projection`. Module names are transformers'
(`text_model.encoder.layers.{i}...`), so the official files load with `load_state_dict(strict=True)`.

    h0 = token_embedding[ids] + position_embedding[0..T-1]
    h  = h + out_proj(attn(LN1(h)))      # causal: token t sees tokens 0..t
    h  = h + fc2(act(fc1(LN2(h))))       # act: quick_gelu for CLIP-L, exact gelu for CLIP-G
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int  # 49408 for both SD3 encoders
    width: int  # D: 768 (CLIP-L) / 1280 (CLIP-G)
    num_layers: int  # 12 / 32
    num_heads: int  # 12 / 20: always width // 64 in released models
    mlp_width: int  # 3072 / 5120
    max_positions: int  # 77 in released models: the most token ids one call takes
    projection_dim: int  # P: 768 / 1280
    activation: str  # "quick_gelu" (CLIP-L) or "gelu" (CLIP-G); not visible in the weights
    # Which token is pooled. None: the position of the largest id (argmax), the rule transformers applies when
    # the config says eos_token_id == 2, which SD3's configs do (a legacy value). With real CLIP vocabularies
    # end-of-text (49407) is the largest id, so this is the first end-of-text token. An int: the first position
    # holding that id (transformers' rule for every other eos_token_id).
    eos_token_id: int | None = None
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"CLIP activation {self.activation!r} is not one of {ACTIVATIONS}: "
                "CLIP-L uses 'quick_gelu', CLIP-G uses 'gelu'"
            )
        if self.num_heads <= 0 or self.width % self.num_heads:
            raise ValueError(f"CLIP width {self.width} cannot be split into {self.num_heads} heads")

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, Tensor] | Mapping[str, tuple[int, ...]],
        *,
        activation: str,
        num_heads: int | None = None,
        eos_token_id: int | None = None,
    ) -> CLIPConfig:
        """Infer the config from tensor shapes (tensors or plain shape tuples) of our state dict.

        The head count and the activation leave no trace in the weights: heads default to width // 64 (true of
        every released CLIP), pass `num_heads` for other models (tiny test models); the caller says which
        activation (it knows which file is CLIP-L and which is CLIP-G).
        """
        shape = {k: tuple(v.shape) if isinstance(v, Tensor) else tuple(v) for k, v in sd.items()}
        prefix = "text_model.encoder.layers."
        needed = ("text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight")
        if any(k not in shape for k in needed) or f"{prefix}0.mlp.fc1.weight" not in shape:
            raise ValueError(f"not a CLIP text-model state dict (no {needed[0]} / {prefix}0.mlp.fc1.weight)")
        vocab_size, width = shape["text_model.embeddings.token_embedding.weight"]
        num_layers = len({k[len(prefix) :].split(".")[0] for k in shape if k.startswith(prefix)})
        projection = shape.get("text_projection.weight", (width, width))  # absent: identity, see loaders
        if num_heads is None and width % 64:
            raise InputError(f"CLIP width {width} is not a multiple of 64, so its number of heads cannot be inferred "
                             "(released CLIP encoders have 64-wide heads); give num_heads")
        return cls(
            vocab_size=vocab_size,
            width=width,
            num_layers=num_layers,
            num_heads=num_heads if num_heads is not None else width // 64,
            mlp_width=shape[f"{prefix}0.mlp.fc1.weight"][0],
            max_positions=shape["text_model.embeddings.position_embedding.weight"][0],
            projection_dim=projection[0],
            activation=activation,
            eos_token_id=eos_token_id,
        )


@dataclass(frozen=True)
class CLIPOutput:
    penultimate: Tensor  # (B, T, D): residual stream before the last layer, not final-normed
    pooled: Tensor  # (B, P): text_projection(final_layer_norm(h_L)[end-of-text position])


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI's sigmoid approximation of GELU, which CLIP-L was trained with."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        H = self.num_heads
        # (B, T, D) -> (B, H, T, Dh)
        q, k, v = (p(x).view(B, T, H, D // H).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        # Causal only: SD3 passes no padding mask, so real tokens never see the padding after them, and padding
        # tokens (whose states SD3 does use) see the whole prompt. Default scale is Dh^-0.5.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.activation = cfg.activation
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)  # (B, T, mlp_width)
        h = quick_gelu(h) if self.activation == "quick_gelu" else F.gelu(h)  # gelu: exact erf form
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.self_attn(self.layer_norm1(h))
        return h + self.mlp(self.layer_norm2(h))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, input_ids: Tensor) -> Tensor:
        T = input_ids.shape[1]
        # Positions are made here rather than kept as a buffer: a meta-built module has no buffer data.
        positions = torch.arange(T, device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, D)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_layers))


class CLIPTextTransformer(nn.Module):
    """The part under the `text_model.` prefix of the checkpoint keys."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)


class CLIPTextModel(nn.Module):
    """CLIP text tower + projection; `forward(ids)` returns what SD3 needs from it (a `CLIPOutput`)."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, input_ids: Tensor, *, clip_skip: int = 0) -> CLIPOutput:
        """Encode (B, T) token ids, T <= max_positions (SD3 pads to the tokenizers' model_max_length, 77
        in released models).

        `clip_skip` = k takes the sequence k layers earlier than SD3's default, as diffusers'
        `clip_skip` does (`hidden_states[-(k + 2)]`); the pooled output always uses the full stack.
        """
        B, T = input_ids.shape
        layers = self.text_model.encoder.layers
        if T > self.cfg.max_positions:
            raise ValueError(f"CLIP takes at most {self.cfg.max_positions} tokens, got {T}; truncate the prompt")
        if not 0 <= clip_skip < len(layers):
            raise ValueError(f"clip_skip must be in [0, {len(layers) - 1}], got {clip_skip}")
        h = self.text_model.embeddings(input_ids)  # (B, T, D)
        keep = len(layers) - 1 - clip_skip  # number of layers applied to the returned sequence
        penultimate = h
        for i, layer in enumerate(layers):
            if i == keep:
                penultimate = h
            h = layer(h)
        h = self.text_model.final_layer_norm(h)  # (B, T, D)
        if self.cfg.eos_token_id is None:
            # argmax returns the first of equal maxima, i.e. the first end-of-text token when it is the top id.
            eos = input_ids.argmax(dim=-1)  # (B,)
        else:
            # First position holding the id (0 when it is absent, as in transformers).
            eos = (input_ids == self.cfg.eos_token_id).int().argmax(dim=-1)  # (B,)
        pooled = h[torch.arange(B, device=h.device), eos]  # (B, D)
        return CLIPOutput(penultimate=penultimate, pooled=self.text_projection(pooled))  # pooled: (B, P)
