"""Builds the configured model: one builder per name of :data:`mdaf_rec.registry.MODEL_NAMES`."""

from __future__ import annotations

from typing import Callable, Dict

import torch

from mdaf_rec.config import ModelConfig
from mdaf_rec.features import FeatureSpec
from mdaf_rec.models.baselines import DCNv3CTR, DNNCTR, SequenceCTR
from mdaf_rec.models.ctr import CTRModel
from mdaf_rec.models.mdaf import MDAF
from mdaf_rec.registry import MODEL_NAMES

ModelBuilder = Callable[[FeatureSpec, ModelConfig, torch.device], CTRModel]

# model.name -> builder(spec, cfg, table_device); the keys are exactly MODEL_NAMES (tests/test_registry.py).
MODEL_BUILDERS: Dict[str, ModelBuilder] = {
    "mdaf_mamba": lambda spec, cfg, tables: MDAF(spec, cfg, branch="mamba", table_device=tables),
    "mdaf_bst": lambda spec, cfg, tables: MDAF(spec, cfg, branch="bst", table_device=tables),
    "dcnv3": lambda spec, cfg, tables: DCNv3CTR(spec, cfg, table_device=tables),
    "dnn": lambda spec, cfg, tables: DNNCTR(spec, cfg, table_device=tables),
    "mamba4rec": lambda spec, cfg, tables: SequenceCTR(spec, cfg, encoder="mamba", table_device=tables),
    "bst": lambda spec, cfg, tables: SequenceCTR(spec, cfg, encoder="bst", table_device=tables),
}


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
        ``MDAF`` (``mdaf_mamba``, ``mdaf_bst``), ``DCNv3CTR`` (``dcnv3``), ``DNNCTR`` (``dnn``) or ``SequenceCTR``
        (``mamba4rec``, ``bst``).
    """
    if cfg.name not in MODEL_BUILDERS:
        raise ValueError(f"config key 'model.name': {cfg.name!r} is not one of {list(MODEL_NAMES)}")
    with torch.device(dense_device):
        return MODEL_BUILDERS[cfg.name](spec, cfg, torch.device(table_device))
