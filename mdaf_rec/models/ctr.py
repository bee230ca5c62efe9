"""What every CTR model returns, the shared ``forward`` contract, and the training wrapper."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from mdaf_rec.data.batch import Batch
from mdaf_rec.features import FeatureSpec
from mdaf_rec.models.dcnv3 import tri_bce_loss
from mdaf_rec.models.embeddings import ManagedIdArch, ManagedLookup


class CTROutput(NamedTuple):
    """Scores of one batch.

    Attributes:
        logit: ``[B]`` click logit.
        gate: ``[B, 1]`` or ``[B, D]`` fusion gate (MDAF only; 1 = static, 0 = sequential).
        lcn_logit: ``[B]`` DCNv3 Linear Cross Network logit (models with a static branch).
        ecn_logit: ``[B]`` DCNv3 Exponential Cross Network logit (models with a static branch).
        static_logit: ``[B]`` MDAF's auxiliary logit of the static embedding alone (training, aux heads on).
        sequential_logit: ``[B]`` MDAF's auxiliary logit of the sequential embedding alone (likewise).
    """

    logit: torch.Tensor
    gate: Optional[torch.Tensor] = None
    lcn_logit: Optional[torch.Tensor] = None
    ecn_logit: Optional[torch.Tensor] = None
    static_logit: Optional[torch.Tensor] = None
    sequential_logit: Optional[torch.Tensor] = None


class CTRModel(nn.Module):
    """Base of every model: ``score(batch)`` computes a :class:`CTROutput`; ``forward`` turns it
    into click probabilities (and, for MDAF, the gate per sample).

    Under ``features.id_mapping: managed`` a model holds one :class:`ManagedIdArch` (``managed_ids``, built by
    :meth:`build_managed_ids`) and runs it once per batch (:meth:`managed_lookup`) for both its archs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.managed_ids: Optional[ManagedIdArch] = None

    def build_managed_ids(self, spec: FeatureSpec, static: bool, sequence: bool, device: torch.device | None) -> None:
        """Adds the managed lookup (``managed`` mapping; nothing under ``vocab``) for a static and/or sequence arch."""
        if spec.managed:
            self.managed_ids = ManagedIdArch(spec, static=static, sequence=sequence, device=device)

    def managed_lookup(self, batch: Batch) -> Optional[ManagedLookup]:
        """The batch's managed rows (``None`` under ``vocab``)."""
        return self.managed_ids(batch.static_features) if self.managed_ids is not None else None

    def score(self, batch: Batch) -> CTROutput:
        raise NotImplementedError

    def forward(
        self, batch: Batch, return_gate: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            batch: the input batch.
            return_gate: also return the gate (MDAF models only).
        Returns:
            ``[B]`` click probabilities, or ``(probabilities, gate)`` with gate ``[B, 1 | D]``.
        """
        out = self.score(batch)
        probs = torch.sigmoid(out.logit)
        if not return_gate:
            return probs
        if out.gate is None:
            raise ValueError(f"{type(self).__name__} has no fusion gate (return_gate=True is for MDAF models)")
        return probs, out.gate


class CTRTrainOutput(NamedTuple):
    """Detached values a training step reports (``TrainPipelineSparseDist`` passes them through)."""

    loss: torch.Tensor
    logit: torch.Tensor
    labels: torch.Tensor
    gate: Optional[torch.Tensor]


class CTRTrain(nn.Module):
    """Wraps a :class:`CTRModel` with its loss, the shape TorchRec's train pipelines expect.

    The loss is binary cross-entropy on the model's logit. With ``tri_bce`` and a model that exposes
    DCNv3's LCN/ECN logits, DCNv3's Tri-BCE auxiliary terms are added:
    ``w_lcn · BCE(lcn) + w_ecn · BCE(ecn)`` with ``w = max(0, BCE_side − BCE_main)`` (not detached, as in
    the official DCNv3 code), ``BCE_main`` being the model's own (for MDAF: the fused) logit. With
    ``aux_loss_weight`` ``λ > 0`` and a model that returns per-branch logits (MDAF with auxiliary heads),
    ``λ · (BCE(static_logit) + BCE(sequential_logit))`` is added.

    With ``precision="bf16"`` the model's forward runs under ``torch.autocast(bfloat16)`` on the batch's
    device (matmuls in bfloat16; tables, logit layers, the scan's accumulation and the loss in float32).

    Args:
        model: the CTR model.
        tri_bce: add the Tri-BCE auxiliary terms when the model has them.
        aux_loss_weight: ``λ`` of the per-branch auxiliary BCE terms.
        precision: ``fp32`` or ``bf16``.
        device_type: the device type the model runs on (``cuda`` / ``cpu``), for autocast.
    """

    def __init__(
        self,
        model: CTRModel,
        tri_bce: bool = True,
        precision: str = "fp32",
        device_type: str = "cpu",
        aux_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.tri_bce = tri_bce
        self.aux_loss_weight = aux_loss_weight
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
        self.device_type = device_type

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, CTRTrainOutput]:
        """
        Args:
            batch: the input batch.
        Returns:
            ``(loss, CTRTrainOutput)``: the scalar loss to back-propagate and detached outputs.
        """
        if self.autocast_dtype is None:
            out = self.model.score(batch)
        else:
            with torch.autocast(self.device_type, dtype=self.autocast_dtype):
                out = self.model.score(batch)
            out = CTROutput(*(t.float() if t is not None else None for t in out))
        labels = batch.labels.float()
        if self.tri_bce and out.lcn_logit is not None and out.ecn_logit is not None:
            loss = tri_bce_loss(out.logit, out.lcn_logit, out.ecn_logit, labels)
        else:
            loss = F.binary_cross_entropy_with_logits(out.logit, labels)
        if self.aux_loss_weight > 0 and out.static_logit is not None and out.sequential_logit is not None:
            loss = loss + self.aux_loss_weight * (
                F.binary_cross_entropy_with_logits(out.static_logit, labels)
                + F.binary_cross_entropy_with_logits(out.sequential_logit, labels)
            )
        gate = out.gate.detach() if out.gate is not None else None
        return loss, CTRTrainOutput(loss.detach(), out.logit.detach(), labels.detach(), gate)
