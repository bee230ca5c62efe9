"""The sequential branch: ``history ⊕ target`` token sequences through Mamba4Rec or BST."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mdaf_rec.config import BSTConfig, MambaConfig
from mdaf_rec.data.batch import Batch
from mdaf_rec.features import FeatureSpec
from mdaf_rec.models.bst import BSTEncoder
from mdaf_rec.models.embeddings import ManagedLookup, SequenceEmbeddingArch
from mdaf_rec.models.mamba import Mamba4RecEncoder

SEQUENCE_ENCODERS = ("mamba", "bst")


class SequenceBranch(nn.Module):
    """``Batch → [B, L+1, D] tokens → encoder → [B, D]`` at the target position.

    Both encoders read right-padded sequences whose last valid token is the target item, and return
    the hidden state there: a target-aware summary of the history.

    Args:
        spec: feature spec (sequence tables, ``sequence_dim``, ``max_history``).
        encoder: ``mamba`` (Mamba4Rec) or ``bst`` (transformer).
        mamba: Mamba4Rec hyper-parameters (used when ``encoder == "mamba"``).
        bst: BST hyper-parameters (used when ``encoder == "bst"``).
        table_device: device of the embedding tables (``meta`` under DMP).
    """

    def __init__(
        self,
        spec: FeatureSpec,
        encoder: str,
        mamba: MambaConfig,
        bst: BSTConfig,
        table_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if encoder not in SEQUENCE_ENCODERS:
            raise ValueError(f"sequence encoder {encoder!r} is not one of {SEQUENCE_ENCODERS}")
        self.embeddings = SequenceEmbeddingArch(spec, device=table_device)
        self.encoder: nn.Module
        if encoder == "mamba":
            self.encoder = Mamba4RecEncoder(
                d_model=spec.sequence_dim,
                num_layers=mamba.num_layers,
                d_state=mamba.d_state,
                d_conv=mamba.d_conv,
                expand=mamba.expand,
                dropout=mamba.dropout,
            )
        else:
            self.encoder = BSTEncoder(
                d_model=spec.sequence_dim,
                num_layers=bst.num_layers,
                num_heads=bst.num_heads,
                ffn_dim=bst.ffn_dim,
                dropout=bst.dropout,
                max_len=spec.max_history + 1,
            )

    def forward(self, batch: Batch, managed: Optional[ManagedLookup] = None) -> torch.Tensor:
        """
        Args:
            batch: the input batch (sequence features are read).
            managed: the batch's managed lookup (``managed`` mapping only: read instead of the sequence features).
        Returns:
            ``[B, sequence_dim]`` sequential embedding.
        """
        # [B, L+1, D], [B]; without a managed lookup the embeddings may be serving's drop-in (one argument)
        if managed is not None:
            tokens, lengths = self.embeddings(batch.sequence_features, managed)
        else:
            tokens, lengths = self.embeddings(batch.sequence_features)
        return self.encoder(tokens, lengths)  # [B, D]
