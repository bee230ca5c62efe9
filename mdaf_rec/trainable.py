"""The trainable module, built one way for training, evaluation, planning and export.

    vocabulary sizes ─▶ FeatureSpec ─▶ model (models.factory.build_model) ─▶ CTRTrain (the loss)
                                                                  ─▶ fused table optimizer (training, planning)

``mdaf-rec train`` shards it with DMP, ``mdaf-rec plan`` plans it, ``mdaf-rec eval`` and ``mdaf-rec export``
load a checkpoint into it. It lives outside :mod:`mdaf_rec.models` because attaching the fused optimizer is
TorchRec-distributed business (:mod:`mdaf_rec.sharding`), which the models themselves do not import.

Checkpoint keys: a checkpoint's ``"model"`` entry is DMP's state dict, whose keys leave out DMP's own wrapper
prefix and are therefore :class:`CTRTrain`'s (``model.<CTRModel key>``, ``model`` being CTRTrain's attribute).
That is why an unsharded ``CTRTrain`` (export, on CPU without a process group) loads a training checkpoint as
it is, with :func:`mdaf_rec.checkpoint.load_model_weights` (``tests/test_trainable.py`` checks the keys).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Union

import torch

from mdaf_rec.config import Config, check_mamba_conv
from mdaf_rec.features import FeatureSpec
from mdaf_rec.models.ctr import CTRTrain
from mdaf_rec.models.factory import build_model
from mdaf_rec.sharding import apply_sparse_optimizer

Device = Union[torch.device, str]

class TrainModule(NamedTuple):
    """The feature spec the tables are sized by, and the trainable module built on it."""

    spec: FeatureSpec
    module: CTRTrain


def build_train_module(
    cfg: Config,
    vocab_sizes: Mapping[str, int],
    *,
    table_device: Device,
    dense_device: Device,
    compute_device: Device,
    with_sparse_optimizer: bool,
) -> TrainModule:
    """The configured model in its loss wrapper, with the fused table optimizer attached when asked.

    Args:
        cfg: the resolved config (``features``, ``model``, ``train.precision``, ``optimizer``).
        vocab_sizes: vocabulary name -> size (the data's, or ``planning.vocab_sizes``).
        table_device: device of the TorchRec tables; ``meta`` to leave them for DMP (or the planner).
        dense_device: device of every other parameter (``meta`` for planning).
        compute_device: the device the module will run on: autocast's device type, and the device the
            sparse optimizer (FBGEMM on CPU has no ``adam``) and Mamba's ``d_conv`` (2 to 4 on CUDA) are
            checked against.
        with_sparse_optimizer: attach ``cfg.optimizer.sparse`` to every table (training, planning). Without
            it DMP still shards the tables with FBGEMM's fused kernels, whose optimizer is then plain SGD
            with no state (evaluation and export: no row-wise/Adagrad/Adam state is allocated).
    """
    compute_device = torch.device(compute_device)
    check_mamba_conv(cfg.model, compute_device.type)
    spec = FeatureSpec.build(cfg.features, vocab_sizes)
    model = build_model(spec, cfg.model, table_device=table_device, dense_device=dense_device)
    module = CTRTrain(model, tri_bce=cfg.model.dcnv3.tri_bce, precision=cfg.train.precision,
                      device_type=compute_device.type, aux_loss_weight=cfg.model.fusion.aux_loss_weight)
    if with_sparse_optimizer:
        apply_sparse_optimizer(module, cfg.optimizer, compute_device)
    return TrainModule(spec, module)
