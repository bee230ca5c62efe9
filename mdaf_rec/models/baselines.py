"""Single-branch baselines on the same inputs and tables as MDAF."""

from __future__ import annotations

import torch

from mdaf_rec.config import ModelConfig
from mdaf_rec.data.batch import Batch
from mdaf_rec.features import FeatureSpec
from mdaf_rec.models.ctr import CTRModel, CTROutput
from mdaf_rec.models.embeddings import StaticEmbeddingArch
from mdaf_rec.models.head import PredictionHead
from mdaf_rec.models.sequence_branch import SequenceBranch
from mdaf_rec.models.static_branch import StaticBranch


class DCNv3CTR(CTRModel):
    """Standalone DCNv3 over the static fields: its averaged LCN/ECN logit is the prediction.

    Args:
        spec: feature spec.
        cfg: model config (``cfg.dcnv3``).
        table_device: device of the embedding tables.
    """

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, table_device: torch.device | None = None) -> None:
        super().__init__()
        self.build_managed_ids(spec, static=True, sequence=False, device=table_device)
        self.static_branch = StaticBranch(spec, cfg.dcnv3, output_dim=None, table_device=table_device)

    def score(self, batch: Batch) -> CTROutput:
        out = self.static_branch(batch, managed=self.managed_lookup(batch))
        return CTROutput(logit=out.logit, lcn_logit=out.lcn_logit, ecn_logit=out.ecn_logit)


class DNNCTR(CTRModel):
    """The plain DNN baseline: the static field embeddings, concatenated, through an MLP
    (``Linear → ReLU → Dropout`` per hidden size, then ``Linear → 1``), as FuxiCTR's DNN.

    Args:
        spec: feature spec (static fields, pooled histories, dense fields).
        cfg: model config (``cfg.dnn``).
        table_device: device of the embedding tables.
    """

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, table_device: torch.device | None = None) -> None:
        super().__init__()
        self.build_managed_ids(spec, static=True, sequence=False, device=table_device)
        self.embeddings = StaticEmbeddingArch(spec, device=table_device)
        self.mlp = PredictionHead(spec.num_static_fields * spec.static_dim, cfg.dnn.hidden, cfg.dnn.dropout)

    def score(self, batch: Batch) -> CTROutput:
        fields = self.embeddings(batch.static_features, batch.dense_features, self.managed_lookup(batch))  # [B, F, d]
        return CTROutput(logit=self.mlp(fields.flatten(start_dim=1)))  # [B]


class SequenceCTR(CTRModel):
    """Standalone sequential model (Mamba4Rec or BST) over ``history ⊕ target`` with MDAF's head.

    Args:
        spec: feature spec.
        cfg: model config (encoder hyper-parameters, head).
        encoder: ``mamba`` or ``bst``.
        table_device: device of the embedding tables.
    """

    def __init__(
        self, spec: FeatureSpec, cfg: ModelConfig, encoder: str, table_device: torch.device | None = None
    ) -> None:
        super().__init__()
        self.build_managed_ids(spec, static=False, sequence=True, device=table_device)
        self.sequence_branch = SequenceBranch(spec, encoder, cfg.mamba, cfg.bst, table_device=table_device)
        self.head = PredictionHead(spec.sequence_dim, cfg.head_hidden, cfg.head_dropout)

    def score(self, batch: Batch) -> CTROutput:
        return CTROutput(logit=self.head(self.sequence_branch(batch, self.managed_lookup(batch))))
