"""Builds the configured model."""

from __future__ import annotations

import torch

from mdaf_rec.config import ModelConfig
from mdaf_rec.features import FeatureSpec
from mdaf_rec.models.baselines import DCNv3CTR, SequenceCTR
from mdaf_rec.models.ctr import CTRModel
from mdaf_rec.models.mdaf import MDAF


def build_model(
    spec: FeatureSpec,
    cfg: ModelConfig,
    table_device: torch.device | str = "cpu",
    dense_device: torch.device | str = "cpu",
) -> CTRModel:
    """The model named by ``cfg.name``.

    Args:
        spec: feature spec.
        cfg: model config.
        table_device: device of the TorchRec tables; ``meta`` to leave them for DMP to materialise
            and shard.
        dense_device: device of every other parameter.
    Returns:
        ``MDAF`` (``mdaf_mamba``, ``mdaf_bst``), ``DCNv3CTR`` (``dcnv3``) or ``SequenceCTR``
        (``mamba4rec``, ``bst``).
    """
    tables = torch.device(table_device)
    with torch.device(dense_device):
        if cfg.name == "mdaf_mamba":
            return MDAF(spec, cfg, branch="mamba", table_device=tables)
        if cfg.name == "mdaf_bst":
            return MDAF(spec, cfg, branch="bst", table_device=tables)
        if cfg.name == "dcnv3":
            return DCNv3CTR(spec, cfg, table_device=tables)
        if cfg.name == "mamba4rec":
            return SequenceCTR(spec, cfg, encoder="mamba", table_device=tables)
        if cfg.name == "bst":
            return SequenceCTR(spec, cfg, encoder="bst", table_device=tables)
    raise ValueError(f"config key 'model.name': unknown model {cfg.name!r}")
