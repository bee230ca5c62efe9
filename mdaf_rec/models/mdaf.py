"""MDAF: Multi-branch Dual Attention Fusion.

A DCNv3 static branch and a sequential branch (Mamba4Rec → MDAF-Mamba, BST → MDAF-BST) each produce
a ``D``-dim embedding; a learned gate mixes them and an MLP head gives the click logit::

    static fields ──EBC──▶ DCNv3 ──▶ s [B, D] ─┐
                                               ├─ GatedFusion ─▶ [B, D] ─ PredictionHead ─▶ logit [B]
    history ⊕ target ─EC─▶ encoder ─▶ q [B, D] ─┘

With ``model.fusion.aux_loss_weight > 0`` a linear logit head on ``s`` and one on ``q`` also score every
training batch (the auxiliary per-branch BCE of :class:`mdaf_rec.models.ctr.CTRTrain`).
"""

from __future__ import annotations

from typing import Optional

import torch

from mdaf_rec.config import ModelConfig
from mdaf_rec.data.batch import Batch
from mdaf_rec.features import FeatureSpec
from mdaf_rec.models.ctr import CTRModel, CTROutput
from mdaf_rec.models.fusion import GatedFusion
from mdaf_rec.models.head import BranchHeads, PredictionHead
from mdaf_rec.models.sequence_branch import SequenceBranch
from mdaf_rec.models.static_branch import StaticBranch


class MDAF(CTRModel):
    """The MDAF model.

    Args:
        spec: feature spec (tables, dims).
        cfg: model config (branch hyper-parameters, gate mode, head).
        branch: sequential branch, ``mamba`` or ``bst``.
        table_device: device of the embedding tables (``meta`` under DMP); dense parameters go to the
            current default device.
    """

    def __init__(
        self, spec: FeatureSpec, cfg: ModelConfig, branch: str, table_device: torch.device | None = None
    ) -> None:
        super().__init__()
        dim = spec.sequence_dim
        self.build_managed_ids(spec, static=True, sequence=True, device=table_device)
        self.static_branch = StaticBranch(spec, cfg.dcnv3, output_dim=dim, table_device=table_device)
        self.sequence_branch = SequenceBranch(spec, branch, cfg.mamba, cfg.bst, table_device=table_device)
        fusion = cfg.fusion
        self.fusion = GatedFusion(dim, mode=cfg.gate, branch_dropout=fusion.branch_dropout,
                                  stop_gradient=fusion.gate_stop_gradient, bias_init=fusion.gate_bias_init)
        self.head = PredictionHead(dim, cfg.head_hidden, cfg.head_dropout)
        # Auxiliary per-branch logit heads: only built (and only in the checkpoint) when their loss is on.
        self.branch_heads: Optional[BranchHeads] = BranchHeads(dim) if fusion.aux_loss_weight > 0 else None

    def score(self, batch: Batch) -> CTROutput:
        """
        Args:
            batch: the input batch.
        Returns:
            fused logit ``[B]``, gate ``[B, 1 | D]``, the DCNv3 branch's LCN/ECN logits ``[B]`` and, in
            training with auxiliary heads, each branch's own logit ``[B]``.
        """
        managed = self.managed_lookup(batch)
        static = self.static_branch(batch, return_embedding=True, managed=managed)
        assert static.embedding is not None
        sequential = self.sequence_branch(batch, managed)  # [B, D]
        fused, gate = self.fusion(static.embedding, sequential)  # [B, D], [B, 1 | D]
        static_logit = sequential_logit = None
        if self.branch_heads is not None and self.training:
            static_logit, sequential_logit = self.branch_heads(static.embedding, sequential)  # [B], [B]
        return CTROutput(
            logit=self.head(fused), gate=gate, lcn_logit=static.lcn_logit, ecn_logit=static.ecn_logit,
            static_logit=static_logit, sequential_logit=sequential_logit,
        )
