"""The MDAF research code's interface (``MDAF_Mamba`` / ``MDAF_BST``) over the TorchRec model.

The classes take the research code's constructor arguments and forward keywords (dense ``[B, L]``
histories with 0 as padding, ``other_features`` dict), convert them to a :class:`~mdaf_rec.data.batch.Batch`
and call the TorchRec-based :class:`~mdaf_rec.models.mdaf.MDAF` they hold as ``.model``, so existing
scripts switch by changing one import. Ids are used as table indices directly, as in the research code
(tables have ``*_vocab_size`` rows; 0 is padding).

The wrapped model sits where :class:`~mdaf_rec.models.ctr.CTRTrain` keeps it, so the ``state_dict`` keys
(``model.static_branch...``) are those of a training run's model: ``build_model(m.spec, m.model_config)``
wrapped in ``CTRTrain`` loads the state dict of ``m`` and vice versa.

Research-code arguments that have no meaning here are refused with a ``TypeError`` that says why,
rather than silently ignored: ``item_embed_dim`` / ``category_embed_dim`` (sequence tokens are the sum
of ``embedding_dim``-wide item and category embeddings) and ``static_embed_dim`` (the static fields
live in the DCNv3 branch, ``dcnv3_embed_dim``) are accepted only at values that agree with that.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from mdaf_rec.config import BSTConfig, DCNv3Config, FeaturesConfig, MambaConfig, ModelConfig
from mdaf_rec.data.batch import Batch, build_batch
from mdaf_rec.features import FeatureSpec
from mdaf_rec.models.embeddings import check_sequence_features, check_static_features
from mdaf_rec.models.mdaf import MDAF


class _ResearchMDAF(nn.Module):
    """Research-code constructor and forward around an :class:`MDAF` (``self.model``).

    Attributes:
        model: the TorchRec MDAF model.
        spec: its feature spec (tables, dims, ``max_history``).
        model_config: its model config (``build_model(spec, model_config)`` builds the same model).
    """

    _model_name = ""

    def __init__(
        self,
        item_vocab_size: int,
        category_vocab_size: int,
        user_vocab_size: int,
        hour_vocab_size: int = 24,
        dayofweek_vocab_size: int = 7,
        dcnv3_embed_dim: int = 16,
        dcnv3_lcn_layers: int = 3,
        dcnv3_ecn_layers: int = 3,
        dcnv3_dropout: Optional[float] = None,
        embedding_dim: int = 128,
        prediction_hidden_dims: Sequence[int] = (128, 64),
        dropout: float = 0.2,
        max_history: int = 50,
        item_embed_dim: Optional[int] = None,
        category_embed_dim: Optional[int] = None,
        static_embed_dim: Optional[int] = None,
        **branch_kwargs: Any,
    ) -> None:
        if (hour_vocab_size, dayofweek_vocab_size) != (24, 7):
            raise TypeError("hour_vocab_size / dayofweek_vocab_size must be 24 / 7 (hour and day of week)")
        for name, value in (("item_embed_dim", item_embed_dim), ("category_embed_dim", category_embed_dim)):
            if value not in (None, embedding_dim):
                raise TypeError(
                    f"{name}={value}: mdaf_rec embeds sequence tokens at embedding_dim={embedding_dim} "
                    "(item + category embeddings summed, one table per id space shared with the target)"
                )
        if static_embed_dim not in (None, dcnv3_embed_dim):
            raise TypeError(f"static_embed_dim={static_embed_dim}: static fields use dcnv3_embed_dim={dcnv3_embed_dim}")
        features = FeaturesConfig(static_dim=dcnv3_embed_dim, sequence_dim=embedding_dim, max_history=max_history)
        cfg = ModelConfig(
            name=self._model_name,
            dcnv3=_dcnv3_config(dcnv3_lcn_layers, dcnv3_ecn_layers, dcnv3_dropout),
            mamba=MambaConfig(),
            bst=BSTConfig(),
            head_hidden=list(prediction_hidden_dims),
            head_dropout=dropout,
        )
        max_history = self._configure_branch(cfg, embedding_dim, dropout, max_history, branch_kwargs)
        features.max_history = max_history
        super().__init__()
        self.spec = FeatureSpec.build(
            features, {"user": user_vocab_size, "item": item_vocab_size, "category": category_vocab_size}
        )
        self.model_config = cfg
        self.model = MDAF(self.spec, cfg, branch="mamba" if self._model_name == "mdaf_mamba" else "bst")

    def _configure_branch(
        self, cfg: ModelConfig, embedding_dim: int, dropout: float, max_history: int, kwargs: Dict[str, Any]
    ) -> int:
        """Sets the branch config from the research-code keywords; returns the history length."""
        raise NotImplementedError

    def forward(
        self,
        target_item: torch.Tensor,
        target_category: torch.Tensor,
        item_history: torch.Tensor,
        category_history: torch.Tensor,
        other_features: Dict[str, torch.Tensor],
        return_gate: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Research-code forward.

        Args:
            target_item: ``[B]`` item index.
            target_category: ``[B]`` category index.
            item_history: ``[B, L]`` item indices, 0 = padding (non-zero entries keep their order, the
                last one being the most recent; only the most recent ``max_history`` are used).
            category_history: ``[B, L]`` category indices aligned with ``item_history``.
            other_features: ``user_id``, ``hour``, ``dayofweek``, each ``[B]``.
            return_gate: also return the gate ``[B, 1]``.
        Returns:
            ``[B]`` click probabilities (and the gate).
        """
        batch = self.to_batch(target_item, target_category, item_history, category_history, other_features)
        return self.model(batch, return_gate=return_gate)

    def to_batch(
        self,
        target_item: torch.Tensor,
        target_category: torch.Tensor,
        item_history: torch.Tensor,
        category_history: torch.Tensor,
        other_features: Dict[str, torch.Tensor],
    ) -> Batch:
        """Converts research-code inputs to a :class:`Batch` on their device, validated: this is where
        the research code's data enters, so ids outside their tables and misaligned histories are
        refused here with :class:`~mdaf_rec.models.embeddings.InputIdError` naming the feature."""
        valid = item_history != 0  # [B, L]
        # Keep only the most recent max_history valid entries: rank valid entries from the end.
        from_end = valid.flip(1).long().cumsum(1).flip(1)  # [B, L]: valid entries at or after this one
        keep = valid & (from_end <= self.spec.max_history)
        lengths = keep.sum(1)  # [B]
        static = {
            "user": other_features["user_id"],
            "item": target_item,
            "category": target_category,
            "hour": other_features["hour"],
            "dayofweek": other_features["dayofweek"],
        }
        batch_size, device = target_item.shape[0], target_item.device
        batch = build_batch(
            self.spec,
            static_ids=[static[k].long() for k in self.spec.static_keys],
            target_ids=[target_item.long(), target_category.long()],
            history_ids=[item_history[keep].long(), category_history[keep].long()],
            history_lengths=lengths,
            dense_features=torch.zeros(batch_size, 0, device=device),
            labels=torch.zeros(batch_size, device=device),
            row_index=torch.arange(batch_size, device=device),
            user_ids=other_features["user_id"].long(),
        )
        check_static_features(batch.static_features, self.spec)
        check_sequence_features(batch.sequence_features, self.spec)
        return batch


class MDAF_Mamba(_ResearchMDAF):  # noqa: N801 - the research code's name
    """MDAF with a Mamba4Rec branch, research-code interface. Branch keywords: ``mamba_hidden_dim``
    (must equal ``embedding_dim``), ``mamba_num_layers``, ``mamba_d_state``, ``mamba_d_conv``,
    ``mamba_expand``."""

    _model_name = "mdaf_mamba"

    def _configure_branch(
        self, cfg: ModelConfig, embedding_dim: int, dropout: float, max_history: int, kwargs: Dict[str, Any]
    ) -> int:
        _pop_width(kwargs, "mamba_hidden_dim", embedding_dim)
        cfg.mamba = MambaConfig(
            num_layers=kwargs.pop("mamba_num_layers", 2),
            d_state=kwargs.pop("mamba_d_state", 16),
            d_conv=kwargs.pop("mamba_d_conv", 4),
            expand=kwargs.pop("mamba_expand", 2),
            dropout=dropout,
        )
        _refuse_unknown("MDAF_Mamba", kwargs)
        return max_history


class MDAF_BST(_ResearchMDAF):  # noqa: N801 - the research code's name
    """MDAF with a BST branch, research-code interface. Branch keywords: ``bst_embed_dim`` (must equal
    ``embedding_dim``), ``bst_max_seq_len``, ``bst_num_transformer_layers``, ``bst_num_heads``,
    ``bst_d_ff``, ``bst_dropout``."""

    _model_name = "mdaf_bst"

    def _configure_branch(
        self, cfg: ModelConfig, embedding_dim: int, dropout: float, max_history: int, kwargs: Dict[str, Any]
    ) -> int:
        _pop_width(kwargs, "bst_embed_dim", embedding_dim)
        cfg.bst = BSTConfig(
            num_layers=kwargs.pop("bst_num_transformer_layers", 2),
            num_heads=kwargs.pop("bst_num_heads", 4),
            ffn_dim=kwargs.pop("bst_d_ff", None),
            dropout=kwargs.pop("bst_dropout", 0.1),
        )
        max_history = kwargs.pop("bst_max_seq_len", max_history)
        _refuse_unknown("MDAF_BST", kwargs)
        return max_history


def _dcnv3_config(lcn_layers: int, ecn_layers: int, dropout: Optional[float]) -> DCNv3Config:
    cfg = DCNv3Config(num_lcn_layers=lcn_layers, num_ecn_layers=ecn_layers)
    if dropout is not None:  # the research code has one DCNv3 dropout for both networks
        cfg.lcn_dropout = cfg.ecn_dropout = dropout
    return cfg


def _pop_width(kwargs: Dict[str, Any], key: str, embedding_dim: int) -> None:
    width = kwargs.pop(key, embedding_dim)
    if width != embedding_dim:
        raise TypeError(f"{key} ({width}) must equal embedding_dim ({embedding_dim})")


def _refuse_unknown(name: str, kwargs: Dict[str, Any]) -> None:
    if kwargs:
        raise TypeError(f"{name} got unexpected keyword arguments {sorted(kwargs)}")
