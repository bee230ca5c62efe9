"""The static branch: pooled static-field embeddings fed through DCNv3."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mdaf_rec.config import DCNv3Config
from mdaf_rec.data.batch import Batch
from mdaf_rec.features import FeatureSpec
from mdaf_rec.models.dcnv3 import DCNv3, DCNv3Output
from mdaf_rec.models.embeddings import ManagedLookup, StaticEmbeddingArch


class StaticBranch(nn.Module):
    """``Batch → [B, F, static_dim] field embeddings → DCNv3``.

    Args:
        spec: feature spec (static fields, dense features, dims).
        cfg: DCNv3 hyper-parameters.
        output_dim: size of the static embedding handed to the fusion (128); ``None`` for the
            standalone DCNv3 model, which only uses the logits.
        table_device: device of the embedding tables (``meta`` under DMP).
    """

    def __init__(
        self,
        spec: FeatureSpec,
        cfg: DCNv3Config,
        output_dim: Optional[int],
        table_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.embeddings = StaticEmbeddingArch(spec, device=table_device)
        self.dcnv3 = DCNv3(
            num_fields=spec.num_static_fields,
            field_dim=spec.static_dim,
            num_heads=cfg.num_heads,
            num_deep_cross_layers=cfg.num_ecn_layers,
            num_shallow_cross_layers=cfg.num_lcn_layers,
            deep_net_dropout=cfg.ecn_dropout,
            shallow_net_dropout=cfg.lcn_dropout,
            layer_norm=cfg.layer_norm,
            output_dim=output_dim,
        )

    def forward(
        self, batch: Batch, return_embedding: bool = False, managed: Optional[ManagedLookup] = None
    ) -> DCNv3Output:
        """
        Args:
            batch: the input batch (static and dense features are read).
            return_embedding: also compute the ``[B, output_dim]`` static embedding.
            managed: the batch's managed lookup (``managed`` mapping only).
        Returns:
            DCNv3 logits ``[B]`` (averaged, LCN, ECN) and optionally the embedding.
        """
        fields = self.embeddings(batch.static_features, batch.dense_features, managed)  # [B, F, d]
        return self.dcnv3(fields, return_embedding=return_embedding)
