"""DCNv3: the static (non-sequential) branch of MDAF.

Re-implementation of "DCNv3: Towards Next Generation Deep Cross Network for CTR Prediction"
(Li et al., arXiv:2407.13349), following the authors' reference code (``salmon1802/DCNv3``,
``src/DCNv3.py``) in every computational detail:

* :class:`MultiHeadFeatureEmbedding` splits each field embedding into ``num_heads`` chunks and,
  inside a head, puts the first halves of all fields before their second halves.
* :class:`LinearCrossNetwork` (LCN, ``x_{l+1} = x_0 * (c_l + b_l) + x_l``) and
  :class:`ExponentialCrossNetwork` (ECN, ``x_{l+1} = x_l * (c_l + b_l) + x_l``) share the
  :class:`SelfMaskCrossLayer`: ``h = W x_l`` maps to half the width, the Self-Mask keeps
  ``h * relu(LayerNorm(h))`` and ``c_l = [h, h * relu(LayerNorm(h))]`` restores the full width.
  Dropout follows every cross layer; a final ``Linear(input_dim, 1)`` shared by the heads gives
  one logit per head, averaged over the heads.
* :class:`DCNv3` averages the LCN and ECN logits; :func:`tri_bce_loss` is the Tri-BCE loss.

Initialisation matches FuxiCTR's ``BaseModel.reset_parameters`` used by the reference code:
``xavier_normal_`` Linear weights, zero Linear biases, cross-layer biases ``b_l ~ U(0, 1)``.

Differences from the reference code (none changes the maths):

* Embedding lookup lives in TorchRec tables outside this module, so
  :class:`MultiHeadFeatureEmbedding` receives the dense ``[B, F, field_dim]`` field embeddings.
  ``field_dim`` here is the *total* per-field width; the reference ``embedding_dim`` is the
  per-head width (``field_dim = embedding_dim * num_heads``).
* Logits instead of probabilities are returned and the loss uses
  ``binary_cross_entropy_with_logits`` (see :func:`tri_bce_loss`).
* :class:`DCNv3` can additionally return a static-branch embedding for MDAF's fusion gate.
"""

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mdaf_rec.models.precision import full_precision_linear

__all__ = [
    "MultiHeadFeatureEmbedding",
    "SelfMaskCrossLayer",
    "LinearCrossNetwork",
    "ExponentialCrossNetwork",
    "DCNv3Output",
    "DCNv3",
    "tri_bce_loss",
]


class MultiHeadFeatureEmbedding(nn.Module):
    """Splits field embeddings into per-head flat vectors, as the reference DCNv3 does.

    Each field embedding ``e_f`` (width ``D``) is cut into ``num_heads`` equal chunks
    ``e_f^h`` (width ``D/H``); head ``h`` gets all fields' chunk ``h``. Inside a head, each
    chunk is halved again (``torch.tensor_split``: the first half gets the extra element when
    ``D/H`` is odd) and the head vector is
    ``[first_half(e_1^h), ..., first_half(e_F^h), second_half(e_1^h), ..., second_half(e_F^h)]``.

    Args:
        num_heads (int): number of heads ``H``; must divide the field embedding width.

    Example::

        mhfe = MultiHeadFeatureEmbedding(num_heads=2)
        out = mhfe(torch.randn(32, 5, 16))  # [32, 2, 40]
    """

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.num_heads = num_heads

    def forward(self, field_embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            field_embeddings (torch.Tensor): ``[B, F, D]`` field embeddings.

        Returns:
            torch.Tensor: ``[B, H, F * D / H]`` per-head inputs of the cross networks.
        """
        dim = field_embeddings.size(-1)
        if dim % self.num_heads != 0:
            raise ValueError(
                f"field embedding width {dim} is not divisible by num_heads={self.num_heads}"
            )
        # [B, H, F, D/H]
        heads = torch.stack(torch.tensor_split(field_embeddings, self.num_heads, dim=-1), dim=1)
        # [B, H, F, ceil(D/2H)] and [B, H, F, floor(D/2H)]
        first, second = torch.tensor_split(heads, 2, dim=-1)
        # [B, H, F*D/H]
        return torch.cat([first.flatten(start_dim=2), second.flatten(start_dim=2)], dim=-1)


class SelfMaskCrossLayer(nn.Module):
    """One DCNv3 cross layer with the Self-Mask.

    Computes ``h = W x`` (``W``: ``input_dim -> input_dim / 2``, no bias), optionally
    batch-normalises it over the head channel, builds the Self-Mask
    ``mask = relu(LayerNorm(h))`` (``relu(h)`` without layer norm), then
    ``c = [h, h * mask]`` and returns ``dropout(x_base * (c + b) + x)``.
    ``x_base`` is ``x_0`` for the LCN and ``x`` itself for the ECN.

    Args:
        input_dim (int): per-head width ``D_h`` of ``x``; must be even.
        num_heads (int): number of heads (the channel count of the optional batch norm).
        layer_norm (bool): apply ``LayerNorm`` to ``h`` inside the Self-Mask.
        batch_norm (bool): apply ``BatchNorm1d(num_heads)`` to ``h``.
        dropout (float): dropout rate on the layer output.
    """

    def __init__(
        self,
        input_dim: int,
        num_heads: int,
        layer_norm: bool,
        batch_norm: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        if input_dim % 2 != 0:
            raise ValueError(f"input_dim must be even for the Self-Mask, got {input_dim}")
        self.weight = nn.Linear(input_dim, input_dim // 2, bias=False)
        self.bias = nn.Parameter(torch.empty(input_dim))
        self.batch_norm: Optional[nn.BatchNorm1d] = (
            nn.BatchNorm1d(num_heads) if batch_norm else None
        )
        self.layer_norm: Optional[nn.LayerNorm] = (
            nn.LayerNorm(input_dim // 2) if layer_norm else None
        )
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``xavier_normal_`` for ``W`` and ``U(0, 1)`` for ``b``, as in the reference code."""
        nn.init.xavier_normal_(self.weight.weight)
        nn.init.uniform_(self.bias)

    def forward(self, x_base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x_base (torch.Tensor): ``[B, H, D_h]`` term multiplied with the crossed features.
            x (torch.Tensor): ``[B, H, D_h]`` current hidden state ``x_l``.

        Returns:
            torch.Tensor: ``[B, H, D_h]`` next hidden state ``x_{l+1}``.
        """
        h = self.weight(x)  # [B, H, D_h/2]
        if self.batch_norm is not None:
            h = self.batch_norm(h)
        mask = F.relu(self.layer_norm(h) if self.layer_norm is not None else h)
        crossed = torch.cat([h, h * mask], dim=-1)  # [B, H, D_h]
        return self.dropout(x_base * (crossed + self.bias) + x)


class _CrossNetwork(nn.Module):
    """Stack of :class:`SelfMaskCrossLayer` followed by a head-shared ``Linear(D_h, 1)``."""

    def __init__(
        self,
        input_dim: int,
        num_layers: int,
        net_dropout: float,
        num_heads: int,
        layer_norm: bool,
        batch_norm: bool,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.layers = nn.ModuleList(
            SelfMaskCrossLayer(input_dim, num_heads, layer_norm, batch_norm, net_dropout)
            for _ in range(num_layers)
        )
        self.fc = nn.Linear(input_dim, 1)
        nn.init.xavier_normal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def _logit(self, hidden: torch.Tensor) -> torch.Tensor:
        # [B, H, D_h] -> [B, H, 1] -> [B]; float32 under autocast
        return full_precision_linear(self.fc, hidden).mean(dim=1).squeeze(-1)


class LinearCrossNetwork(_CrossNetwork):
    """DCNv3's shallow network (LCN): ``x_{l+1} = x_0 * (c_l + b_l) + x_l``.

    Interaction order grows linearly with depth.

    Args:
        input_dim (int): per-head input width ``D_h`` (``F * field_dim / H``); must be even.
        num_layers (int): number of cross layers.
        net_dropout (float): dropout after every cross layer.
        num_heads (int): number of heads ``H``.
        layer_norm (bool): layer norm inside the Self-Mask.
        batch_norm (bool): batch norm over the head channel of ``W x``.
    """

    def __init__(
        self,
        input_dim: int,
        num_layers: int = 3,
        net_dropout: float = 0.3,
        num_heads: int = 1,
        layer_norm: bool = True,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(input_dim, num_layers, net_dropout, num_heads, layer_norm, batch_norm)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x (torch.Tensor): ``[B, H, D_h]`` multi-head input ``x_0``.

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: the logit ``[B]`` (per-head logits averaged over
            heads) and the final hidden state ``[B, H, D_h]``.
        """
        x0 = x
        for layer in self.layers:
            x = layer(x0, x)
        return self._logit(x), x


class ExponentialCrossNetwork(_CrossNetwork):
    """DCNv3's deep network (ECN): ``x_{l+1} = x_l * (c_l + b_l) + x_l``.

    Interaction order doubles with every layer.

    Args:
        input_dim (int): per-head input width ``D_h`` (``F * field_dim / H``); must be even.
        num_layers (int): number of cross layers.
        net_dropout (float): dropout after every cross layer.
        num_heads (int): number of heads ``H``.
        layer_norm (bool): layer norm inside the Self-Mask.
        batch_norm (bool): batch norm over the head channel of ``W x``.
    """

    def __init__(
        self,
        input_dim: int,
        num_layers: int = 3,
        net_dropout: float = 0.1,
        num_heads: int = 1,
        layer_norm: bool = True,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(input_dim, num_layers, net_dropout, num_heads, layer_norm, batch_norm)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x (torch.Tensor): ``[B, H, D_h]`` multi-head input ``x_1``.

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: the logit ``[B]`` (per-head logits averaged over
            heads) and the final hidden state ``[B, H, D_h]``.
        """
        for layer in self.layers:
            x = layer(x, x)
        return self._logit(x), x


class DCNv3Output(NamedTuple):
    """Output of :class:`DCNv3`.

    Attributes:
        logit (torch.Tensor): ``[B]`` main logit, ``(lcn_logit + ecn_logit) / 2``.
        lcn_logit (torch.Tensor): ``[B]`` logit of the shallow (LCN) network.
        ecn_logit (torch.Tensor): ``[B]`` logit of the deep (ECN) network.
        embedding (Optional[torch.Tensor]): ``[B, output_dim]`` static-branch embedding, only
            when ``return_embedding=True``, else ``None``.
    """

    logit: torch.Tensor
    lcn_logit: torch.Tensor
    ecn_logit: torch.Tensor
    embedding: Optional[torch.Tensor]


class DCNv3(nn.Module):
    """DCNv3 over pre-looked-up field embeddings.

    The static-branch embedding (``return_embedding=True``) is
    ``Linear(2 * F * field_dim, output_dim)`` applied to the concatenation of the final LCN and
    ECN hidden states (each flattened over heads to ``[B, F * field_dim]``), i.e. the
    representations the two logits are read from. The projection is only evaluated when asked
    for; it is not part of the reference model and receives no gradient from the logits.

    Args:
        num_fields (int): number of fields ``F``.
        field_dim (int): per-field embedding width; divisible by ``num_heads`` and with
            ``num_fields * field_dim / num_heads`` even.
        num_heads (int): number of heads ``H``.
        num_deep_cross_layers (int): ECN depth.
        num_shallow_cross_layers (int): LCN depth.
        deep_net_dropout (float): ECN dropout.
        shallow_net_dropout (float): LCN dropout.
        layer_norm (bool): layer norm inside the Self-Masks.
        batch_norm (bool): batch norm over heads inside the cross layers.
        output_dim (Optional[int]): width of the static-branch embedding; ``None`` for a standalone
            CTR model that never returns one (no projection parameters are created).

    Example::

        model = DCNv3(num_fields=8, field_dim=16)
        out = model(torch.randn(32, 8, 16), return_embedding=True)
        out.logit.shape, out.embedding.shape  # [32], [32, 128]
    """

    def __init__(
        self,
        num_fields: int,
        field_dim: int = 16,
        num_heads: int = 1,
        num_deep_cross_layers: int = 3,
        num_shallow_cross_layers: int = 3,
        deep_net_dropout: float = 0.1,
        shallow_net_dropout: float = 0.3,
        layer_norm: bool = True,
        batch_norm: bool = False,
        output_dim: Optional[int] = 128,
    ) -> None:
        super().__init__()
        if field_dim % num_heads != 0:
            raise ValueError(f"field_dim={field_dim} is not divisible by num_heads={num_heads}")
        self.num_fields = num_fields
        self.field_dim = field_dim
        total_dim = num_fields * field_dim
        head_dim = total_dim // num_heads
        self.multi_head = MultiHeadFeatureEmbedding(num_heads)
        self.ecn = ExponentialCrossNetwork(
            head_dim, num_deep_cross_layers, deep_net_dropout, num_heads, layer_norm, batch_norm
        )
        self.lcn = LinearCrossNetwork(
            head_dim, num_shallow_cross_layers, shallow_net_dropout, num_heads, layer_norm,
            batch_norm,
        )
        self.embedding_proj: Optional[nn.Linear] = None
        if output_dim is not None:
            self.embedding_proj = nn.Linear(2 * total_dim, output_dim)
            nn.init.xavier_normal_(self.embedding_proj.weight)
            nn.init.zeros_(self.embedding_proj.bias)

    def forward(
        self, field_embeddings: torch.Tensor, return_embedding: bool = False
    ) -> DCNv3Output:
        """
        Args:
            field_embeddings (torch.Tensor): ``[B, F, field_dim]`` field embeddings.
            return_embedding (bool): also compute the ``[B, output_dim]`` static embedding.

        Returns:
            DCNv3Output: logits ``[B]`` of the model, the LCN and the ECN, and the embedding
            (``None`` unless ``return_embedding``).
        """
        if field_embeddings.shape[1:] != (self.num_fields, self.field_dim):
            raise ValueError(
                f"field_embeddings must be [B, {self.num_fields}, {self.field_dim}], "
                f"got {list(field_embeddings.shape)}"
            )
        x = self.multi_head(field_embeddings)  # [B, H, F*d/H]
        ecn_logit, ecn_hidden = self.ecn(x)  # [B], [B, H, F*d/H]
        lcn_logit, lcn_hidden = self.lcn(x)  # [B], [B, H, F*d/H]
        logit = (ecn_logit + lcn_logit) * 0.5
        embedding = None
        if return_embedding:
            if self.embedding_proj is None:
                raise ValueError("return_embedding=True needs a DCNv3 built with an output_dim")
            # [B, 2*F*d] -> [B, output_dim]
            hidden = torch.cat(
                [lcn_hidden.flatten(start_dim=1), ecn_hidden.flatten(start_dim=1)], dim=-1
            )
            embedding = self.embedding_proj(hidden)
        return DCNv3Output(logit, lcn_logit, ecn_logit, embedding)


def tri_bce_loss(
    logit: torch.Tensor,
    lcn_logit: torch.Tensor,
    ecn_logit: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """DCNv3's Tri-BCE loss with adaptive side-network weights.

    ``L = L_main + w_lcn * L_lcn + w_ecn * L_ecn`` with ``L_*`` the mean BCE of each logit and
    ``w_* = max(0, L_* - L_main)``. As in the reference code the weights are clamped but
    **not detached**: gradients flow through ``w_*`` too (while ``L_side > L_main`` a side term
    contributes ``(2 L_side - L_main)`` times the gradient of ``L_side`` and ``-L_side`` times
    that of ``L_main``). The clamp uses ``relu``, whose gradient at exactly 0 is 0,
    like the reference ``torch.where(w > 0, w, 0)``.

    The reference code applies ``binary_cross_entropy`` to sigmoid outputs; using
    ``binary_cross_entropy_with_logits`` on the logits is mathematically identical and
    numerically stabler.

    Args:
        logit (torch.Tensor): ``[B]`` main logit.
        lcn_logit (torch.Tensor): ``[B]`` LCN logit.
        ecn_logit (torch.Tensor): ``[B]`` ECN logit.
        labels (torch.Tensor): ``[B]`` binary labels (any float-convertible dtype).

    Returns:
        torch.Tensor: scalar loss.
    """
    labels = labels.to(logit.dtype)
    loss_main = F.binary_cross_entropy_with_logits(logit, labels)
    loss_lcn = F.binary_cross_entropy_with_logits(lcn_logit, labels)
    loss_ecn = F.binary_cross_entropy_with_logits(ecn_logit, labels)
    weight_lcn = F.relu(loss_lcn - loss_main)
    weight_ecn = F.relu(loss_ecn - loss_main)
    return loss_main + weight_lcn * loss_lcn + weight_ecn * loss_ecn
