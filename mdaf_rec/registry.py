"""The names a config may choose, each list written once.

Config validation (:mod:`mdaf_rec.config`), the command line's choices and every error message read
these tuples; the modules that implement the names map them to what they build and are tested to cover
exactly these keys (``tests/test_registry.py``): models → :data:`mdaf_rec.models.factory.MODEL_BUILDERS`,
fused table optimizers → :data:`mdaf_rec.sharding.SPARSE_OPTIMIZER_CLASSES`, dense optimizers →
:data:`mdaf_rec.sharding.DENSE_OPTIMIZER_CLASSES`, gate modes → :class:`mdaf_rec.models.fusion.GatedFusion`,
precisions → :class:`mdaf_rec.models.ctr.CTRTrain`, data sharding modes → :class:`mdaf_rec.data.loader.EpochPlan`, eviction policies →
:data:`mdaf_rec.managed_ids.EVICTION_POLICIES`.

Nothing here imports torch, so the config stays loadable without it.
"""

from __future__ import annotations

from typing import Dict, Tuple

MODEL_NAMES: Tuple[str, ...] = ("mdaf_mamba", "mdaf_bst", "dcnv3", "dnn", "mamba4rec", "bst")
"""``model.name``: MDAF with a Mamba4Rec or BST branch, and the four single-branch baselines."""

FUSED_MODELS: Tuple[str, ...] = ("mdaf_mamba", "mdaf_bst")
"""The models with a fusion gate (``model.fusion`` applies to them only)."""

GATE_MODES: Tuple[str, ...] = ("scalar", "vector")
"""``model.gate``: one fusion gate per sample, or one per embedding dimension."""

DENSE_OPTIMIZERS: Tuple[str, ...] = ("adam", "adamw")
"""``optimizer.dense``: the optimizer of every non-table parameter."""

FUSED_SPARSE_OPTIMIZERS: Tuple[str, ...] = ("sgd", "adagrad", "rowwise_adagrad", "adam")
"""The fused (FBGEMM, applied in backward) optimizers of the embedding tables."""

DENSE_TABLES = "dense"
"""``optimizer.sparse: dense``: no fused optimizer; every table is ``data_parallel`` with the dense compute
kernel and is trained by ``optimizer.dense`` (its own parameter group: ``sparse_lr``, ``sparse_eps``,
``sparse_weight_decay``), as FuxiCTR trains its tables with Adam."""

DENSE_TABLE_MODELS: Tuple[str, ...] = ("dcnv3", "dnn")
"""The models :data:`DENSE_TABLES` can train: pooled tables only. TorchRec 1.8's ``data_parallel``
``EmbeddingCollection`` (the sequence models' tables, each shared by a target and a history feature) fails in
its output step (``construct_jagged_tensors``: split sizes of both features against one feature's rows)."""

SPARSE_OPTIMIZERS: Tuple[str, ...] = FUSED_SPARSE_OPTIMIZERS + (DENSE_TABLES,)
"""``optimizer.sparse``: the fused optimizers, or the dense one (:data:`DENSE_TABLES`)."""

CPU_SPARSE_OPTIMIZERS: Tuple[str, ...] = ("sgd", "adagrad", "rowwise_adagrad", DENSE_TABLES)
"""The table optimizers that run on CPU (FBGEMM's fused ``adam`` needs a GPU)."""

PRECISIONS: Tuple[str, ...] = ("fp32", "bf16")
"""``train.precision``: float32, or bfloat16 autocast of the dense branches."""

MONITOR_METRICS: Tuple[str, ...] = ("auc", "gauc", "logloss", "ne")
"""``train.monitor``: the validation metrics a run can select its best checkpoint and stop early on."""

METRIC_MODES: Tuple[str, ...] = ("exact", "streaming")
"""``eval.metrics``: every row gathered and ranked exactly, or per-rank histograms and sums with GAUC routed by
user (:mod:`mdaf_rec.streaming_metrics`)."""

ID_MAPPINGS: Tuple[str, ...] = ("vocab", "managed")
"""``features.id_mapping``: raw ids -> rows through a vocabulary built from the training split (on the host), or
inside the model by TorchRec's managed-collision modules (``features.id_spaces.<space>.rows`` rows, eviction)."""

EVICTION_POLICIES: Tuple[str, ...] = ("lru", "lfu", "distance_lfu")
"""``features.id_spaces.<space>.eviction`` under ``managed``: TorchRec's MCH eviction policies."""

TIME_FIELDS: Dict[str, int] = {"hour": 24, "dayofweek": 7}
"""Fields derived from ``timestamp`` (an id space's ``column``) and their fixed table sizes, under every mapping."""

DATA_SHARDING: Tuple[str, ...] = ("own_share", "every_rank_reads_all")
"""``data.sharding``: each rank reads its own ~1/W share of a split, or every rank reads all of it and takes its
slice of every global batch (exact 1-vs-W-process equivalence)."""
