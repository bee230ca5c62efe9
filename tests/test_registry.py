"""Each list of names is written once (mdaf_rec/registry.py); what implements the names covers exactly it,
and config validation, the command line and error messages read it."""

from __future__ import annotations

import pytest
import torch

from conftest import small_spec
from mdaf_rec import registry
from mdaf_rec.config import ConfigError, ModelConfig, load_config
from mdaf_rec.models.ctr import CTRTrain
from mdaf_rec.models.factory import MODEL_BUILDERS, build_model
from mdaf_rec.models.fusion import GatedFusion
from mdaf_rec.sharding import DENSE_OPTIMIZER_CLASSES, SPARSE_OPTIMIZER_CLASSES


def test_implementations_cover_exactly_the_registered_names() -> None:
    assert tuple(MODEL_BUILDERS) == registry.MODEL_NAMES
    assert tuple(SPARSE_OPTIMIZER_CLASSES) == registry.FUSED_SPARSE_OPTIMIZERS
    assert registry.SPARSE_OPTIMIZERS == registry.FUSED_SPARSE_OPTIMIZERS + (registry.DENSE_TABLES,)
    assert tuple(DENSE_OPTIMIZER_CLASSES) == registry.DENSE_OPTIMIZERS
    assert set(registry.CPU_SPARSE_OPTIMIZERS) < set(registry.SPARSE_OPTIMIZERS)
    gate_widths = {mode: GatedFusion(8, mode).gate.out_features for mode in registry.GATE_MODES}
    assert gate_widths == {"scalar": 1, "vector": 8}
    with pytest.raises(ValueError, match=r"gate mode 'matrix' is not one of \['scalar', 'vector'\]"):
        GatedFusion(8, "matrix")
    model = build_model(small_spec(), ModelConfig(name="dcnv3"))
    dtypes = {p: CTRTrain(model, precision=p).autocast_dtype for p in registry.PRECISIONS}
    assert dtypes == {"fp32": None, "bf16": torch.bfloat16}


@pytest.mark.parametrize("name", registry.MODEL_NAMES)
def test_every_registered_model_builds(name: str) -> None:
    assert type(build_model(small_spec(), ModelConfig(name=name))).__name__ in {"MDAF", "DCNv3CTR", "DNNCTR", "SequenceCTR"}


@pytest.mark.parametrize(
    "override, listed",
    [("model.name=mdaf", registry.MODEL_NAMES), ("model.gate=matrix", registry.GATE_MODES),
     ("optimizer.dense=sgd", registry.DENSE_OPTIMIZERS), ("optimizer.sparse=lamb", registry.SPARSE_OPTIMIZERS),
     ("train.precision=fp16", registry.PRECISIONS), ("data.sharding=rows", registry.DATA_SHARDING)],
)
def test_config_errors_list_the_registered_names(override: str, listed) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"config key '{key}'") as e:
        load_config(None, [override])
    assert str(list(listed)) in str(e.value)
