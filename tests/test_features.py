"""The feature spec names the user id space; serving takes the user column by that name, not by position."""

from __future__ import annotations

from typing import Dict, List

import torch

from mdaf_rec.config import FeaturesConfig, IdSpaceConfig, ModelConfig
from mdaf_rec.data.batch import Batch
from mdaf_rec.features import USER_SPACE, FeatureSpec
from mdaf_rec.models.factory import build_model
from mdaf_rec.serving import INPUT_NAMES, ServingModule, example_inputs

SIZES: Dict[str, int] = {"user": 40, "item": 90, "category": 12}


def _spec(order: List[str]) -> FeatureSpec:
    spaces = {
        "user": IdSpaceConfig(column="user_id"),
        "item": IdSpaceConfig(column="item_id", history_column="item_history"),
        "category": IdSpaceConfig(column="category_id", history_column="category_history"),
        "hour": IdSpaceConfig(column="hour"),
    }
    cfg = FeaturesConfig(id_spaces={name: spaces[name] for name in order}, static_dim=4, sequence_dim=8, max_history=5)
    return FeatureSpec.build(cfg, {k: v for k, v in SIZES.items() if k in order})


def test_user_field_is_found_by_name() -> None:
    assert _spec(["user", "item", "category", "hour"]).user_field == 0
    assert _spec(["item", "hour", "user", "category"]).user_field == 2
    assert _spec(["item", "category", "hour"]).user_field is None
    assert USER_SPACE == "user"


def test_serving_reads_the_user_column_wherever_it_is() -> None:
    spec = _spec(["item", "hour", "user", "category"])
    model = build_model(spec, ModelConfig(name="dcnv3"))
    seen: List[Batch] = []
    score = model.score

    def recording_score(batch: Batch):
        seen.append(batch)
        return score(batch)

    module = ServingModule(model, spec)
    module.model.score = recording_score  # type: ignore[method-assign]
    inputs = list(example_inputs(module, 3))
    inputs[INPUT_NAMES.index("static_ids")] = torch.tensor([[5, 1, 31, 7], [6, 2, 32, 8], [7, 3, 33, 9]])
    module(*inputs)
    assert seen[0].user_id.tolist() == [31, 32, 33]

    no_user = _spec(["item", "category", "hour"])
    module = ServingModule(build_model(no_user, ModelConfig(name="dcnv3")), no_user)
    module(*example_inputs(module, 2))  # no user space: zeros, no error
