"""BST: Behavior Sequence Transformer encoder (a sequential branch of MDAF).

Re-implementation of the transformer part of "Behavior Sequence Transformer for E-commerce
Recommendation in Alibaba" (Chen et al., arXiv:1905.06874), in the post-norm form used by the
paper and FuxiCTR's ``model_zoo/BST``: self-attention -> dropout -> residual -> LayerNorm ->
FFN (Linear, LeakyReLU, Linear) -> dropout -> residual -> LayerNorm.

The encoder reads a right-padded sequence of item tokens whose last valid token is the target
item and returns the target position's final hidden state (FuxiCTR's ``"target"`` pooling).

Choices where the references leave freedom:

* Positions are learned embeddings *added* to the tokens and counted back from the target:
  the token at index ``t`` gets position ``lengths - 1 - t`` (target 0, most recent history
  item 1, ...). Results therefore depend neither on the padded length ``L`` nor on what sits in
  padded slots, and "most recent" is always aligned to the same embedding.
* ``ffn_dim`` defaults to ``d_model`` (FuxiCTR's ``ffn_dim=model_dim``).
* A single ``dropout`` rate is used on attention probabilities and on both sub-layer outputs
  (as in ``torch.nn.TransformerEncoderLayer``).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiHeadSelfAttention", "TransformerLayer", "BSTEncoder"]


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention using ``F.scaled_dot_product_attention``.

    Args:
        d_model (int): model width ``D``.
        num_heads (int): number of heads; must divide ``d_model``.
        dropout (float): dropout on the attention probabilities (training only).
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): ``[B, L, D]`` input sequence.
            key_mask (torch.Tensor): ``[B, L]`` bool, ``True`` for keys that may be attended
                (valid positions); every row needs at least one ``True``.

        Returns:
            torch.Tensor: ``[B, L, D]`` attended sequence.
        """
        batch, length, d_model = x.shape
        # [B, L, 3D] -> 3 x [B, heads, L, D/heads]
        q, k, v = (
            self.qkv(x)
            .view(batch, length, 3, self.num_heads, d_model // self.num_heads)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        attended = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=key_mask[:, None, None, :],  # [B, 1, 1, L], broadcast over heads/queries
            dropout_p=self.dropout if self.training else 0.0,
        )  # [B, heads, L, D/heads]
        return self.out(attended.transpose(1, 2).reshape(batch, length, d_model))


class TransformerLayer(nn.Module):
    """Post-norm transformer layer as in BST / FuxiCTR.

    ``s = LN1(x + dropout(MHSA(x)))``; ``out = LN2(s + dropout(FFN(s)))`` with
    ``FFN = Linear(D, ffn_dim) -> LeakyReLU -> Linear(ffn_dim, D)``.

    Args:
        d_model (int): model width ``D``.
        num_heads (int): attention heads.
        ffn_dim (int): hidden width of the FFN.
        dropout (float): dropout on attention probabilities and sub-layer outputs.
        use_layer_norm (bool): apply the two LayerNorms (else identity).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        use_layer_norm: bool = True,
    ) -> None:
        super().__init__()
        self.attention = MultiHeadSelfAttention(d_model, num_heads, dropout)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_dim), nn.LeakyReLU(), nn.Linear(ffn_dim, d_model)
        )
        self.dropout = nn.Dropout(dropout)
        self.norm1: nn.Module = nn.LayerNorm(d_model) if use_layer_norm else nn.Identity()
        self.norm2: nn.Module = nn.LayerNorm(d_model) if use_layer_norm else nn.Identity()

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): ``[B, L, D]`` input sequence.
            key_mask (torch.Tensor): ``[B, L]`` bool, ``True`` at valid positions.

        Returns:
            torch.Tensor: ``[B, L, D]`` output sequence.
        """
        s = self.norm1(x + self.dropout(self.attention(x, key_mask)))
        return self.norm2(s + self.dropout(self.ffn(s)))


class BSTEncoder(nn.Module):
    """Behavior Sequence Transformer encoder returning the target item's representation.

    Args:
        d_model (int): token width ``D``.
        num_layers (int): number of :class:`TransformerLayer`.
        num_heads (int): attention heads; must divide ``d_model``.
        ffn_dim (Optional[int]): FFN hidden width; ``None`` means ``d_model`` (FuxiCTR default).
        dropout (float): dropout on attention probabilities and sub-layer outputs.
        max_len (int): maximum valid length (history + target); size of the position table.
        use_layer_norm (bool): post-sub-layer LayerNorms.

    Example::

        encoder = BSTEncoder(d_model=128)
        tokens = torch.randn(4, 51, 128)                 # history followed by target, right-padded
        lengths = torch.tensor([51, 10, 1, 30])
        target_repr = encoder(tokens, lengths)           # [4, 128]
    """

    def __init__(
        self,
        d_model: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        ffn_dim: Optional[int] = None,
        dropout: float = 0.1,
        max_len: int = 51,
        use_layer_norm: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.max_len = max_len
        self.position = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.position.weight, std=0.02)
        self.layers = nn.ModuleList(
            TransformerLayer(
                d_model,
                num_heads,
                d_model if ffn_dim is None else ffn_dim,
                dropout,
                use_layer_norm,
            )
            for _ in range(num_layers)
        )

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """
        Args:
            tokens (torch.Tensor): ``[B, L, D]`` right-padded sequences; index ``lengths - 1``
                holds the target item, indices before it the history (oldest first). Padded
                slots may contain anything finite or not: they are zeroed and never attended.
            lengths (torch.Tensor): ``[B]`` int64 valid lengths,
                ``1 <= lengths <= min(L, max_len)``. Not checked here (that would wait for the
                device every step): :class:`~mdaf_rec.models.embeddings.SequenceEmbeddingArch` makes
                them in range from histories validated where data enters.

        Returns:
            torch.Tensor: ``[B, D]`` final hidden state at the target position.
        """
        batch, length, _ = tokens.shape
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape [{batch}], got {list(lengths.shape)}")
        lengths = lengths.to(device=tokens.device, dtype=torch.long)
        steps = torch.arange(length, device=tokens.device)  # [L]
        valid = steps[None, :] < lengths[:, None]  # [B, L]
        # Position counted back from the target; padded slots are clamped and zeroed below.
        positions = (lengths[:, None] - 1 - steps[None, :]).clamp(min=0)  # [B, L]
        x = (tokens + self.position(positions)).masked_fill(~valid[..., None], 0.0)  # [B, L, D]
        for layer in self.layers:
            x = layer(x, valid)
        target = (lengths - 1)[:, None, None].expand(-1, 1, x.size(-1))  # [B, 1, D]
        return x.gather(1, target).squeeze(1)  # [B, D]
