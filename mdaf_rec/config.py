"""Typed, validated configuration.

A config is a tree of dataclasses. YAML files and ``key=value`` overrides are merged into it by
:func:`load_config`; every key is checked against the dataclass fields, so an unknown or mistyped key
is an error that names its dotted path (``model.mamba.d_stat``), never a silently ignored knob.

The configs shipped with the package (``mdaf_rec/configs/*.yaml``, the repository's ``configs/``) are
loadable by name: ``load_config("mdaf_mamba")``, ``mdaf-rec train --config mdaf_mamba``.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type, TypeVar, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from mdaf_rec.errors import UserError
from mdaf_rec.registry import (
    CPU_SPARSE_OPTIMIZERS,
    DATA_SHARDING,
    DENSE_OPTIMIZERS,
    DENSE_TABLE_MODELS,
    DENSE_TABLES,
    EVICTION_POLICIES,
    FUSED_MODELS,
    GATE_MODES,
    ID_MAPPINGS,
    METRIC_MODES,
    MODEL_NAMES,
    MONITOR_METRICS,
    PRECISIONS,
    SPARSE_OPTIMIZERS,
    TIME_FIELDS,
)

T = TypeVar("T")

PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
"""The configs shipped with the package (in a checkout, ``mdaf_rec/configs`` is a link to ``configs/``)."""


class ConfigError(UserError, ValueError):
    """A configuration value or key is invalid; the message names the dotted key."""


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------


@dataclass
class IdSpaceConfig:
    """One id space: one vocabulary and one embedding table per embedding collection.

    Args:
        column: canonical-schema column holding the target id (``item_id``), or ``hour`` /
            ``dayofweek`` for fields derived from ``timestamp``.
        history_column: list column holding the history of this id space (``item_history``), if any.
            Target and history share one table.
        hash_buckets: if set, ids are hashed into this many buckets instead of enumerated (``vocab`` mapping).
        rows: ``managed`` mapping: table rows of the space (the last one is the row of ids without a row of their
            own); a multiple of the number of processes it trains on. Required there, refused under ``vocab``.
        eviction: ``managed`` mapping: which ids lose their row when new ids need one, one of
            :data:`mdaf_rec.registry.EVICTION_POLICIES` (``lru``: least recently seen, ``lfu``: least often
            seen, ``distance_lfu``: least often, discounted by time since last seen).
        eviction_interval: ``managed`` mapping: training steps between admission/eviction rounds (new ids get a
            row only at a round). A checkpoint keeps only what the last round decided, so resuming is exact with
            1, or when checkpoints fall on rounds (``train.checkpoint_every_steps`` a multiple of it).
    """

    column: str
    history_column: Optional[str] = None
    hash_buckets: Optional[int] = None
    rows: Optional[int] = None
    eviction: str = "lfu"
    eviction_interval: int = 1


def _default_id_spaces() -> Dict[str, IdSpaceConfig]:
    return {
        "user": IdSpaceConfig(column="user_id"),
        "item": IdSpaceConfig(column="item_id", history_column="item_history"),
        "category": IdSpaceConfig(column="category_id", history_column="category_history"),
        "hour": IdSpaceConfig(column="hour"),
        "dayofweek": IdSpaceConfig(column="dayofweek"),
    }


@dataclass
class FeaturesConfig:
    """Feature and table specification (see :mod:`mdaf_rec.features`).

    Args:
        id_spaces: id space name -> :class:`IdSpaceConfig`. Every id space is a static (pooled) field
            of the DCNv3 branch; those with a ``history_column`` also get a sequence table.
        id_mapping: how raw ids become table rows, one of :data:`mdaf_rec.registry.ID_MAPPINGS`: ``vocab``
            (a vocabulary per id space built from the training split, unseen ids share one OOV row) or
            ``managed`` (raw ids go into the model, TorchRec's managed-collision modules give ids rows and evict
            them; sizes and eviction per space in ``id_spaces``; see ``docs/architecture.md``, "Managed ids").
        extra_sparse: extra int64 columns, each its own id space and static field (``vocab`` mapping only).
        dense: float columns fed to the static branch as dense fields.
        dense_log1p: compress dense values with ``sign(x)·log(1 + |x|)`` before embedding them (prices and
            counts are heavy-tailed); turn off for features already normalised.
        static_dim: dimension of the pooled static field embeddings (DCNv3 field dim).
        sequence_dim: dimension of the unpooled sequence embeddings (and of the fused embedding).
        max_history: histories are truncated to their most recent ``max_history`` entries.
        min_count: ids seen fewer times than this in the training split map to out-of-vocabulary.
        timezone: IANA time zone for ``hour`` / ``dayofweek``; ``null`` takes the dataset's
            ``meta.json`` value, else UTC. Training resolves it and records the zone in the run's
            ``config.yaml``; eval and export use that one (a different ``meta.json`` zone is reported).
        pooled_history: the static branch also sees each history as one more field: the mean of its ids'
            rows in the id space's static table (the table the target id reads; an empty history is a zero
            vector), as FuxiCTR's DNN / DCNv3 see sequence fields. Off: the static branch sees the target,
            user, time and extra fields only, as MDAF's research code.
        table_init_scale: static (pooled) table rows start uniform in ``[-s, s]``; ``null`` keeps TorchRec's
            ``±sqrt(1 / rows)``. FuxiCTR initialises embeddings from N(0, 1e-4²).
        pooled_lists: extra ``list<int64>`` column -> id space (an id space other than a time field, or a
            ``extra_sparse`` field): the static branch also sees the column as one more field, the mean of its ids'
            rows in that space's static table (ids mapped by its vocabulary, unseen ones to the OOV row; an empty
            list is a zero vector), as ``pooled_history`` sees the histories. Each list has its own length (not
            aligned with the histories) and is truncated to its most recent ``max_history`` ids. E.g. the behaviour
            log histories of ``mdaf-rec data taobao-ad --behavior-log``: ``{pv_cate_history: category}``.
            ``vocab`` mapping only.
    """

    id_spaces: Dict[str, IdSpaceConfig] = field(default_factory=_default_id_spaces)
    id_mapping: str = "vocab"
    extra_sparse: List[str] = field(default_factory=list)
    dense: List[str] = field(default_factory=list)
    dense_log1p: bool = True
    static_dim: int = 16
    sequence_dim: int = 128
    max_history: int = 50
    min_count: int = 1
    timezone: Optional[str] = None
    pooled_history: bool = False
    table_init_scale: Optional[float] = None
    pooled_lists: Dict[str, str] = field(default_factory=dict)


@dataclass
class DCNv3Config:
    num_heads: int = 1
    num_lcn_layers: int = 3
    num_ecn_layers: int = 3
    lcn_dropout: float = 0.3
    ecn_dropout: float = 0.1
    layer_norm: bool = True
    tri_bce: bool = True


@dataclass
class DNNConfig:
    """The plain DNN baseline: an MLP over the concatenated static field embeddings."""

    hidden: List[int] = field(default_factory=lambda: [256, 128, 64])
    dropout: float = 0.0


@dataclass
class MambaConfig:
    num_layers: int = 2
    d_state: int = 16
    d_conv: int = 4  # causal convolution width; 2 to 4 on CUDA (causal-conv1d's kernel, check_mamba_conv)
    expand: int = 2
    dropout: float = 0.2


@dataclass
class BSTConfig:
    """BST hyper-parameters; ``ffn_dim`` ``null`` means ``sequence_dim`` (FuxiCTR's default)."""

    num_layers: int = 2
    num_heads: int = 4
    dropout: float = 0.1
    ffn_dim: Optional[int] = None


@dataclass
class FusionConfig:
    """Training remedies of MDAF's gated fusion; the defaults are the plain gate (``docs/results.md`` §5).

    Args:
        aux_loss_weight: ``λ`` of an auxiliary BCE per branch: a linear logit head on the static embedding
            ``s`` and one on the sequential ``q``, each trained on the click; the loss is
            ``BCE(fused) + λ · (BCE(s) + BCE(q))``. The heads score in training only. 0: no auxiliary heads.
        branch_dropout: fraction of training samples that see one branch only: half of them lose ``s`` (gate
            set to 0), half lose ``q`` (gate set to 1), so the head learns to score from either branch alone.
        gate_stop_gradient: the gate reads ``s`` and ``q`` detached: the fused loss trains the gate's own
            weights but cannot reshape the branches through the gate.
        gate_bias_init: the gate's initial bias (``-2``: ``g = σ(-2) ≈ 0.12`` at the start, the sequential
            branch first); ``null``: PyTorch's default initialisation.
    """

    aux_loss_weight: float = 0.0
    branch_dropout: float = 0.0
    gate_stop_gradient: bool = False
    gate_bias_init: Optional[float] = None


@dataclass
class ModelConfig:
    """Model architecture.

    Args:
        name: one of :data:`mdaf_rec.registry.MODEL_NAMES` (``mdaf_mamba``, ``mdaf_bst``, ``dcnv3``, ``dnn``,
            ``mamba4rec``, ``bst``).
        gate: one of :data:`mdaf_rec.registry.GATE_MODES`: ``scalar`` (one gate per sample) or ``vector``
            (one per embedding dimension).
        fusion: MDAF's fusion remedies (:class:`FusionConfig`; MDAF models only).
        head_hidden: hidden sizes of the prediction head MLP.
        head_dropout: dropout of the prediction head.
    """

    name: str = "mdaf_mamba"
    dcnv3: DCNv3Config = field(default_factory=DCNv3Config)
    dnn: DNNConfig = field(default_factory=DNNConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    bst: BSTConfig = field(default_factory=BSTConfig)
    gate: str = "scalar"
    fusion: FusionConfig = field(default_factory=FusionConfig)
    head_hidden: List[int] = field(default_factory=lambda: [128, 64])
    head_dropout: float = 0.2


@dataclass
class OptimizerConfig:
    """Optimizers: a fused one applied in backward to the embedding tables, and a dense one.

    Args:
        dense: ``adam`` or ``adamw`` for every non-table parameter.
        lr: dense learning rate.
        weight_decay: dense weight decay (L2 for ``adam``, decoupled for ``adamw``).
        sparse: fused table optimizer: ``sgd``, ``adagrad``, ``rowwise_adagrad`` (FBGEMM on CPU supports
            only these three) or ``adam`` (GPU only); or ``dense``: the tables are ``data_parallel`` with the
            dense kernel and trained by the ``dense`` optimizer (every row, every step, as FuxiCTR does).
        sparse_lr: table learning rate.
        sparse_eps: epsilon of the Adagrad / Adam table optimizers.
        sparse_weight_decay: table weight decay on the rows a batch looks up (``rowwise_adagrad``: L2,
            ``adam``: decoupled; FBGEMM's ``sgd`` and ``adagrad`` have none); ``dense``: the dense
            optimizer's weight decay on every row.
        static_sparse_lr: learning rate of the static (pooled, ``EmbeddingBagCollection``) tables, the ones
            that memorise first; ``null``: ``sparse_lr``. The sequence tables keep ``sparse_lr``. Fused table
            optimizers only.
        static_sparse_weight_decay: weight decay of the static tables (as ``sparse_weight_decay``); ``null``:
            ``sparse_weight_decay``. Fused table optimizers only.
    """

    dense: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-5
    sparse: str = "rowwise_adagrad"
    sparse_lr: float = 0.02
    sparse_eps: float = 1e-8
    sparse_weight_decay: float = 0.0
    static_sparse_lr: Optional[float] = None
    static_sparse_weight_decay: Optional[float] = None


@dataclass
class DataConfig:
    """Where the data is and how it is read.

    Args:
        path: canonical dataset folder (``train``, ``val``, ``test`` splits).
        num_workers: DataLoader worker processes per rank (0 = read in the training process).
        vocab_dir: where vocabularies (and the validation record) are written when the dataset folder is
            read-only (default: the dataset's own ``vocab/`` folder).
        sharding: which rows each rank reads (``docs/data.md``, "Sharding"): ``own_share`` (each rank
            reads only its ~1/W of every split: every row once per epoch, reads scale with the ranks) or
            ``every_rank_reads_all`` (every rank reads the whole split and takes its slice of each global
            batch: one step of W processes sees exactly the rows of one 1-process step; for tests and
            small data).
        from_date: train on the rows of the training split whose LOCAL date (``features.timezone``) is on or
            after this day, ``YYYY-MM-DD`` (``null``: from its first row); validation and test are whole.
        to_date: ... and on or before this day (``null``: to its last row). With either set, the rows are
            written once to a day slice of the dataset (:mod:`mdaf_rec.data.days`) and the run trains on it.
    """

    path: str = "data/synth"
    num_workers: int = 0
    vocab_dir: Optional[str] = None
    sharding: str = "own_share"
    from_date: Optional[str] = None
    to_date: Optional[str] = None


@dataclass
class TrainConfig:
    """The training loop.

    Args:
        epochs: maximum number of epochs.
        batch_size: GLOBAL batch size; each of the W ranks gets ``batch_size / W`` rows of every batch.
        eval_batch_size: global batch size of evaluation.
        monitor: what "better on validation" means for the best checkpoint, early stopping and
            ``lr_decay_on_plateau``: validation metric -> weight, score = sum of weight x metric, higher is
            better. ``{auc: 1}`` (default): AUC; ``{logloss: -1}``: logloss (the calibrated epoch);
            ``{auc: 1, logloss: -1}``: FuxiCTR's default. Metrics: ``auc``, ``gauc``, ``logloss``, ``ne``.
        patience: early stopping: epochs without a better validation score (``monitor``) before stopping.
        lr_decay_on_plateau: after an epoch without a better validation score, multiply every learning rate
            (dense and tables) by this factor (FuxiCTR: 0.1); ``null``: constant learning rates.
        seed: seeds the model initialisation and the data order.
        log_every: steps between progress log lines.
        threads: torch intra-op threads per process (``null``: the machine's cores divided by the
            processes on this node, so ``torchrun --nproc_per_node N`` never oversubscribes the cores).
        pipeline: overlap input distribution with compute (``TrainPipelineSparseDist``).
        max_steps_per_epoch: cap on steps per epoch (``null``: the whole split).
        checkpoint_every_steps: also checkpoint inside an epoch every this many steps (``null``: only at
            epoch ends); a restarted job continues at the next batch of the same epoch order.
        checkpoint_every_minutes: also checkpoint inside an epoch when this many minutes have passed since
            the last checkpoint (``null``: off); combinable with ``checkpoint_every_steps``.
        keep_step_checkpoints: in-epoch checkpoints kept (the newest K; epoch checkpoints are kept as
            ``best`` / ``last``).
        precision: ``fp32``, or ``bf16`` autocast of the dense branches (CUDA; tables stay fp32).
        init_from: warm start: a new run begins with the weights of another run's checkpoint, ``RUN`` (its
            best), ``RUN:last`` or a checkpoint folder (``mdaf-rec train --init-from``; :mod:`mdaf_rec.warm_start`).
            Its tables grow by the new training split's ids (``null``: a fresh initialisation).
        init_optimizer: with ``init_from``, also take that checkpoint's optimizer state where shapes allow
            (grown table rows start with a fresh state); off: the optimizer starts afresh.
        oov_dropout: static field -> the fraction of training rows whose id in that field the static branch
            sees as out-of-vocabulary (the OOV row, index 1), redrawn each epoch (a function of seed, epoch,
            field and row: the same for any batch size, process or worker count, and on resume). Trains the OOV
            row, which otherwise never sees a training row, so that unseen ids at test time get a learned
            "unknown" embedding. The sequence branch's target and histories keep their ids; evaluation drops
            nothing. Vocabulary fields only (``features.id_mapping: vocab``, not hashed, not time fields).
    """

    epochs: int = 15
    batch_size: int = 2048
    eval_batch_size: int = 8192
    monitor: Dict[str, float] = field(default_factory=lambda: {"auc": 1.0})
    patience: int = 5
    lr_decay_on_plateau: Optional[float] = None
    seed: int = 42
    log_every: int = 50
    threads: Optional[int] = None
    pipeline: bool = True
    max_steps_per_epoch: Optional[int] = None
    checkpoint_every_steps: Optional[int] = None
    checkpoint_every_minutes: Optional[float] = None
    keep_step_checkpoints: int = 2
    precision: str = "fp32"
    init_from: Optional[str] = None
    init_optimizer: bool = False
    oov_dropout: Dict[str, float] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """How the evaluation metrics are computed.

    Args:
        metrics: ``exact`` (every rank gathers every row: exact AUC and GAUC, ~130 bytes a row per rank),
            ``streaming`` (fixed-size histograms and sums per rank, GAUC routed by user: AUC within a bound
            reported as ``auc_error_bound``, the rest exact; :mod:`mdaf_rec.streaming_metrics`), or ``null``:
            ``exact`` for splits of at most 1,000,000 rows, ``streaming`` above (logged).
        auc_bins: score bins of the streaming AUC (more: a smaller error bound, a larger all-reduce).
    """

    metrics: Optional[str] = None
    auc_bins: int = 262144  # mdaf_rec.streaming_metrics.AUC_BINS


def _taobao_vocab_sizes() -> Dict[str, int]:
    return {"user": 577_482, "item": 335_164, "category": 5_480}


@dataclass
class PlanningConfig:
    """Table sizes for planning without data (``mdaf-rec plan``, ``tools/bench_train.py``), and the memory the
    planner of ``mdaf-rec train`` may fill.

    Args:
        vocab_sizes: id space -> table rows (default: the Taobao set-up of the research code). Time
            fields have fixed sizes; every other id space and extra sparse field needs an entry.
        hbm_gb: device memory per rank in GiB for ``mdaf-rec train``'s planner (``null``: the GPU's
            total memory, ``torch.cuda.get_device_properties``; unused on CPU).
        ddr_gb: host memory per rank in GiB for ``mdaf-rec train``'s planner (``null``: this host's
            physical memory divided by its ranks).
    """

    vocab_sizes: Dict[str, int] = field(default_factory=_taobao_vocab_sizes)
    hbm_gb: Optional[float] = None
    ddr_gb: Optional[float] = None


@dataclass
class Config:
    """Root of a run's configuration."""

    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    planning: PlanningConfig = field(default_factory=PlanningConfig)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def validate(cfg: Config) -> Config:
    """Checks cross-field constraints; raises :class:`ConfigError` naming the key."""
    f = cfg.features
    _require(f.static_dim > 0, "features.static_dim", "must be > 0")
    _require(f.sequence_dim > 0, "features.sequence_dim", "must be > 0")
    _require(f.max_history >= 1, "features.max_history", "must be >= 1")
    _require(f.min_count >= 1, "features.min_count", "must be >= 1")
    _require(f.table_init_scale is None or f.table_init_scale > 0, "features.table_init_scale",
             "must be > 0 (or null: TorchRec's ±sqrt(1 / rows))")
    if f.timezone is not None:
        _require(is_timezone(f.timezone), "features.timezone", f"unknown IANA time zone {f.timezone!r}")
    _require(f.id_mapping in ID_MAPPINGS, "features.id_mapping", f"{f.id_mapping!r} is not one of {list(ID_MAPPINGS)}")
    for name, space in f.id_spaces.items():
        _require(bool(space.column), f"features.id_spaces.{name}.column", "must name a column")
        if space.hash_buckets is not None:
            _require(space.hash_buckets >= 1, f"features.id_spaces.{name}.hash_buckets", "must be >= 1")
        _validate_managed_space(cfg, name, space)
    _require(f.id_mapping != "managed" or not f.extra_sparse, "features.extra_sparse",
             "extra sparse fields need a vocabulary; under features.id_mapping=managed declare them as id_spaces "
             "(column and rows)")
    for name in f.extra_sparse:
        _require(name not in f.id_spaces, "features.extra_sparse", f"{name!r} is already an id space")
    for key in ("item", "category"):
        _require(key in f.id_spaces, "features.id_spaces", f"the {key!r} id space is required")
    _validate_pooled_lists(f)
    m = cfg.model
    _require(m.name in MODEL_NAMES, "model.name", f"{m.name!r} is not one of {list(MODEL_NAMES)}")
    _require(m.gate in GATE_MODES, "model.gate", f"{m.gate!r} is not one of {list(GATE_MODES)}")
    _require(len(m.head_hidden) >= 1 and all(h > 0 for h in m.head_hidden), "model.head_hidden",
             "must be a non-empty list of positive sizes")
    _require(0.0 <= m.head_dropout < 1.0, "model.head_dropout", "must be in [0, 1)")
    fu = m.fusion
    _require(fu.aux_loss_weight >= 0, "model.fusion.aux_loss_weight", "must be >= 0")
    _require(0.0 <= fu.branch_dropout < 1.0, "model.fusion.branch_dropout", "must be in [0, 1)")
    if fu != FusionConfig():
        _require(m.name in FUSED_MODELS, "model.fusion",
                 f"the fusion remedies are for {', '.join(FUSED_MODELS)}, not {m.name!r} (it has no fusion gate)")
    d = m.dcnv3
    _require(d.num_heads >= 1 and f.static_dim % d.num_heads == 0, "model.dcnv3.num_heads",
             f"must be >= 1 and divide features.static_dim={f.static_dim}")
    _require(d.num_lcn_layers >= 1, "model.dcnv3.num_lcn_layers", "must be >= 1")
    _require(d.num_ecn_layers >= 1, "model.dcnv3.num_ecn_layers", "must be >= 1")
    _require(0.0 <= d.lcn_dropout < 1.0, "model.dcnv3.lcn_dropout", "must be in [0, 1)")
    _require(0.0 <= d.ecn_dropout < 1.0, "model.dcnv3.ecn_dropout", "must be in [0, 1)")
    _require(len(m.dnn.hidden) >= 1 and all(h > 0 for h in m.dnn.hidden), "model.dnn.hidden",
             "must be a non-empty list of positive sizes")
    _require(0.0 <= m.dnn.dropout < 1.0, "model.dnn.dropout", "must be in [0, 1)")
    for key in ("num_layers", "d_state", "d_conv", "expand"):
        _require(getattr(m.mamba, key) >= 1, f"model.mamba.{key}", "must be >= 1")
    _require(0.0 <= m.mamba.dropout < 1.0, "model.mamba.dropout", "must be in [0, 1)")
    _require(m.bst.num_layers >= 1, "model.bst.num_layers", "must be >= 1")
    _require(m.bst.num_heads >= 1 and f.sequence_dim % m.bst.num_heads == 0, "model.bst.num_heads",
             f"must be >= 1 and divide features.sequence_dim={f.sequence_dim}")
    _require(0.0 <= m.bst.dropout < 1.0, "model.bst.dropout", "must be in [0, 1)")
    _require(m.bst.ffn_dim is None or m.bst.ffn_dim >= 1, "model.bst.ffn_dim", "must be >= 1 (or null: sequence_dim)")
    o = cfg.optimizer
    _require(o.sparse in SPARSE_OPTIMIZERS, "optimizer.sparse", f"{o.sparse!r} is not one of {list(SPARSE_OPTIMIZERS)}")
    _require(o.sparse != DENSE_TABLES or m.name in DENSE_TABLE_MODELS, "optimizer.sparse",
             f"{DENSE_TABLES!r} tables train with {', '.join(DENSE_TABLE_MODELS)} only, not {m.name!r} (TorchRec's "
             "data_parallel EmbeddingCollection fails on tables shared by a target and a history feature)")
    _require(o.sparse != DENSE_TABLES or f.id_mapping != "managed", "optimizer.sparse",
             f"{DENSE_TABLES!r} tables are data_parallel; managed tables (features.id_mapping=managed) shard row-wise "
             "with a fused table optimizer")
    _require(o.dense in DENSE_OPTIMIZERS, "optimizer.dense", f"{o.dense!r} is not one of {list(DENSE_OPTIMIZERS)}")
    _require(o.lr > 0, "optimizer.lr", "must be > 0")
    _require(o.sparse_lr > 0, "optimizer.sparse_lr", "must be > 0")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _require(o.sparse_eps > 0, "optimizer.sparse_eps", "must be > 0")
    _require(o.sparse_weight_decay >= 0, "optimizer.sparse_weight_decay", "must be >= 0")
    _require(o.sparse_weight_decay == 0 or o.sparse in ("rowwise_adagrad", "adam", DENSE_TABLES),
             "optimizer.sparse_weight_decay",
             f"FBGEMM's {o.sparse!r} table optimizer has no weight decay (rowwise_adagrad: L2; adam: decoupled)")
    _require(o.static_sparse_lr is None or o.static_sparse_lr > 0, "optimizer.static_sparse_lr",
             "must be > 0 (or null: optimizer.sparse_lr)")
    _require(o.static_sparse_weight_decay is None or o.static_sparse_weight_decay >= 0,
             "optimizer.static_sparse_weight_decay", "must be >= 0 (or null: optimizer.sparse_weight_decay)")
    _require(not o.static_sparse_weight_decay or o.sparse in ("rowwise_adagrad", "adam"),
             "optimizer.static_sparse_weight_decay",
             f"FBGEMM's {o.sparse!r} table optimizer has no weight decay (rowwise_adagrad: L2; adam: decoupled)")
    for key in ("static_sparse_lr", "static_sparse_weight_decay"):
        _require(getattr(o, key) is None or o.sparse != DENSE_TABLES, f"optimizer.{key}",
                 f"is for the fused table optimizers; with optimizer.sparse: {DENSE_TABLES} set optimizer.sparse_*")
    t = cfg.train
    _require(t.epochs >= 1, "train.epochs", "must be >= 1")
    _require(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    _require(t.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
    _require(bool(t.monitor), "train.monitor", "names no metric (e.g. {auc: 1} or {logloss: -1})")
    for name, weight in t.monitor.items():
        _require(name in MONITOR_METRICS, f"train.monitor.{name}", f"is not one of {list(MONITOR_METRICS)}")
        _require(isinstance(weight, (int, float)) and weight != 0, f"train.monitor.{name}",
                 "must be a non-zero number (positive: higher is better, negative: lower is better)")
    _require(t.patience >= 1, "train.patience", "must be >= 1")
    _require(t.lr_decay_on_plateau is None or 0 < t.lr_decay_on_plateau < 1, "train.lr_decay_on_plateau",
             "must be in (0, 1) (or null: off)")
    _require(t.seed >= 0, "train.seed", "must be >= 0")
    _require(t.log_every >= 1, "train.log_every", "must be >= 1")
    _require(t.max_steps_per_epoch is None or t.max_steps_per_epoch >= 1, "train.max_steps_per_epoch", "must be >= 1")
    _require(t.threads is None or t.threads >= 1, "train.threads", "must be >= 1 (or null: cores / local processes)")
    _require(t.checkpoint_every_steps is None or t.checkpoint_every_steps >= 1, "train.checkpoint_every_steps",
             "must be >= 1 (or null: epoch ends only)")
    _require(t.checkpoint_every_minutes is None or t.checkpoint_every_minutes > 0, "train.checkpoint_every_minutes",
             "must be > 0 (or null: off)")
    _require(t.keep_step_checkpoints >= 1, "train.keep_step_checkpoints", "must be >= 1")
    _require(t.precision in PRECISIONS, "train.precision", f"{t.precision!r} is not one of {list(PRECISIONS)}")
    _require(t.init_from is None or bool(t.init_from.strip()), "train.init_from",
             "must name a run directory, RUN:last or a checkpoint folder (or null)")
    _require(not t.init_optimizer or t.init_from is not None, "train.init_optimizer",
             "needs train.init_from (the checkpoint whose optimizer state to take)")
    for name, rate in t.oov_dropout.items():
        key = f"train.oov_dropout.{name}"
        _require(0.0 <= rate < 1.0, key, "must be in [0, 1)")
        space = f.id_spaces.get(name)
        _require(space is not None and space.column not in TIME_FIELDS or name in f.extra_sparse, key,
                 f"{name!r} is not a static id field with a vocabulary (id spaces other than time fields, "
                 "or features.extra_sparse)")
        _require(space is None or space.hash_buckets is None, key, "hashed ids have no OOV row")
        _require(f.id_mapping == "vocab", key, "is for features.id_mapping=vocab (managed ids have no OOV row)")
    e = cfg.eval
    _require(e.metrics is None or e.metrics in METRIC_MODES, "eval.metrics",
             f"{e.metrics!r} is not one of {list(METRIC_MODES)} (or null: chosen by the split's size)")
    _require(e.auc_bins >= 2, "eval.auc_bins", "must be >= 2")
    _require(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(cfg.data.sharding in DATA_SHARDING, "data.sharding",
             f"{cfg.data.sharding!r} is not one of {list(DATA_SHARDING)}")
    for key in ("from_date", "to_date"):
        value = getattr(cfg.data, key)
        _require(value is None or parse_date(value) is not None, f"data.{key}",
                 f"{value!r} is not a date YYYY-MM-DD (or null)")
    if cfg.data.from_date is not None and cfg.data.to_date is not None:
        _require(parse_date(cfg.data.from_date) <= parse_date(cfg.data.to_date), "data.to_date",
                 f"{cfg.data.to_date} is before data.from_date {cfg.data.from_date}")
    for name, size in cfg.planning.vocab_sizes.items():
        _require(size >= 1, f"planning.vocab_sizes.{name}", "must be >= 1")
    for key in ("hbm_gb", "ddr_gb"):
        _require(getattr(cfg.planning, key) is None or getattr(cfg.planning, key) > 0, f"planning.{key}",
                 "must be > 0 (or null: this machine's)")
    return cfg


def _validate_pooled_lists(f: FeaturesConfig) -> None:
    """``features.pooled_lists``: each column an extra list (not a column another key reads), each space one with
    a static table and a vocabulary; ``vocab`` mapping only."""
    _require(f.id_mapping != "managed" or not f.pooled_lists, "features.pooled_lists",
             "is for features.id_mapping=vocab (the managed lookup does not read extra lists)")
    spaces = [n for n, s in f.id_spaces.items() if s.column not in TIME_FIELDS] + list(f.extra_sparse)
    read = {s.column for s in f.id_spaces.values()} | {s.history_column for s in f.id_spaces.values()}
    for column, space in f.pooled_lists.items():
        key = f"features.pooled_lists.{column}"
        _require(column not in read | set(f.extra_sparse) | set(f.dense), key,
                 "is a column other features keys read (histories of id spaces: features.pooled_history)")
        _require(space in spaces, key,
                 f"{space!r} is not an id space with a vocabulary (one of {spaces}; add it with features.extra_sparse)")


def _validate_managed_space(cfg: Config, name: str, space: IdSpaceConfig) -> None:
    """The ``managed`` settings of id space ``name``: required (``rows``) and checked under ``managed``, refused
    under ``vocab``."""
    key = f"features.id_spaces.{name}"
    _require(space.eviction in EVICTION_POLICIES, f"{key}.eviction",
             f"{space.eviction!r} is not one of {list(EVICTION_POLICIES)}")
    _require(space.eviction_interval >= 1, f"{key}.eviction_interval", "must be >= 1")
    if cfg.features.id_mapping != "managed" or space.column in TIME_FIELDS:
        _require(space.rows is None, f"{key}.rows",
                 "is for features.id_mapping=managed (vocab tables are sized by the vocabulary; time fields are fixed)")
        return
    _require(space.rows is not None and space.rows >= 2, f"{key}.rows",
             "features.id_mapping=managed needs the table rows of every id space (>= 2; a multiple of the number "
             "of processes)")
    _require(space.hash_buckets is None, f"{key}.hash_buckets", "is for features.id_mapping=vocab")
    every = cfg.train.checkpoint_every_steps
    _require(every is None or every % space.eviction_interval == 0, "train.checkpoint_every_steps",
             f"{every} is not a multiple of {key}.eviction_interval={space.eviction_interval}: a checkpoint between "
             "eviction rounds loses the ids seen since the last round (resume would not be exact)")
    _require(cfg.train.checkpoint_every_minutes is None or space.eviction_interval == 1,
             "train.checkpoint_every_minutes",
             f"timed checkpoints fall between eviction rounds of {key}.eviction_interval={space.eviction_interval} "
             "(resume would not be exact): use train.checkpoint_every_steps, a multiple of it")


def check_managed_world_size(cfg: FeaturesConfig, world_size: int) -> None:
    """Refuses managed table rows that ``world_size`` processes cannot share evenly (TorchRec shards a managed
    table row-wise, each process owning an equal block of rows and of the hashed ids)."""
    if cfg.id_mapping != "managed":
        return
    for name, space in cfg.id_spaces.items():
        if space.rows is not None:
            _require(space.rows % world_size == 0, f"features.id_spaces.{name}.rows",
                     f"{space.rows} is not a multiple of the world size {world_size} (a managed table is sharded "
                     "row-wise in equal blocks; choose rows divisible by every number of processes it runs on)")


# Convolution widths causal-conv1d's CUDA kernel (the Mamba block's fast path) accepts.
CUDA_CONV_WIDTHS = (2, 3, 4)


def check_mamba_conv(cfg: ModelConfig, device_type: str) -> None:
    """Refuses a Mamba ``d_conv`` causal-conv1d's CUDA kernel cannot run when a Mamba model is to run on CUDA."""
    if device_type == "cuda" and "mamba" in cfg.name:
        _require(cfg.mamba.d_conv in CUDA_CONV_WIDTHS, "model.mamba.d_conv",
                 f"{cfg.mamba.d_conv} is not supported on CUDA: causal-conv1d's kernel takes widths 2 to 4")


def check_sparse_optimizer(cfg: OptimizerConfig, device_type: str) -> None:
    """Refuses a table optimizer FBGEMM cannot run on ``device_type`` (``cpu`` or ``cuda``)."""
    _require(device_type != "cpu" or cfg.sparse in CPU_SPARSE_OPTIMIZERS, "optimizer.sparse",
             f"on CPU the tables support {', '.join(CPU_SPARSE_OPTIMIZERS)}; {cfg.sparse!r} needs a GPU "
             "(CUDA is not available here)")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def parse_date(text: Any) -> Optional[datetime.date]:
    """The calendar day ``text`` spells as ``YYYY-MM-DD``; ``None`` if it is not one."""
    if not isinstance(text, str) or len(text) != 10:
        return None
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        return None


def is_timezone(name: Any) -> bool:
    """Whether ``name`` is a string naming a time zone of the IANA database (``Asia/Shanghai``, ``UTC``)."""
    if not isinstance(name, str):
        return False
    try:
        ZoneInfo(name)
    except (ValueError, ZoneInfoNotFoundError):
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def from_dict(cls: Type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Builds dataclass ``cls`` from ``data``; unknown keys and wrong types name their dotted key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key '{path or '<root>'}': expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key '{_join(path, key)}' (known: {sorted(names)})")
    kwargs = {key: _convert(hints[key], value, _join(path, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"config key '{path or '<root>'}': {e}") from None


def to_dict(cfg: Any) -> Any:
    """The plain-data (YAML-serialisable) form of a config tree."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def apply_override(data: Dict[str, Any], override: str) -> None:
    """Applies one ``a.b.c=value`` override (value parsed as YAML) to a plain-data config tree."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, dict) else None
        if not isinstance(child, dict):
            raise ConfigError(f"unknown config key '{'.'.join(parts[: i + 1])}' in override {override!r}")
        node = child
    if parts[-1] not in node:
        raise ConfigError(f"unknown config key '{key.strip()}' in override {override!r}")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({_yaml_problem(e)})") from None
    except ValueError:  # a scalar YAML takes for a date that is none (2017-13-01): the string, checked by its key
        node[parts[-1]] = raw.strip()


def packaged_config_names() -> List[str]:
    """Names of the packaged configs (``demo``, ``mdaf_mamba``, ...), sorted."""
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def resolve_config_path(path: Union[str, Path]) -> Path:
    """``path`` itself when it is a file, has a folder part or a ``.yaml``/``.yml`` suffix; else a bare
    name (``mdaf_mamba``) is the packaged config of that name. An unknown bare name is an error listing
    the packaged ones."""
    path = Path(path)
    if path.is_file() or path.parent != Path(".") or path.suffix in (".yaml", ".yml"):
        return path
    packaged = PACKAGED_CONFIGS / f"{path.name}.yaml"
    if packaged.is_file():
        return packaged
    raise ConfigError(f"{path}: no such config file, and no packaged config of that name "
                      f"(packaged: {', '.join(packaged_config_names())})")


def load_config(
    path: Union[str, Path, None] = None, overrides: Sequence[str] = (), cls: Type[T] = Config
) -> T:
    """Defaults, then the YAML file, then ``key=value`` overrides; validated.

    Args:
        path: YAML file, or the name of a packaged config (``mdaf_mamba``; see :func:`resolve_config_path`),
            or ``None`` for the defaults. Its keys are validated against the schema.
        overrides: ``dotted.key=value`` strings; values are parsed as YAML.
    Returns:
        The validated config.
    """
    data: Dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            with open(path) as fh:
                loaded = yaml.safe_load(fh) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded
    merged = _deep_merge(to_dict(cls()), data, "")
    for override in overrides:
        apply_override(merged, override)
    cfg = from_dict(cls, merged)
    return validate(cfg) if isinstance(cfg, Config) else cfg


def dump_config(cfg: Any, path: Path) -> None:
    """Writes the resolved config as YAML (loadable by :func:`load_config`)."""
    with open(path, "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)


def _deep_merge(base: Dict[str, Any], update: Mapping[str, Any], path: str) -> Dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if key not in base and base:
            # Dicts with free keys (id_spaces) accept new entries; dataclass nodes reject them in
            # from_dict, which knows the schema and names the key.
            out[key] = value
        elif isinstance(base.get(key), dict) and isinstance(value, Mapping) and not _is_free_mapping(path, key):
            out[key] = _deep_merge(base[key], value, _join(path, key))
        else:
            out[key] = value
    return out


def _is_free_mapping(path: str, key: str) -> bool:
    # A YAML ``id_spaces`` / ``vocab_sizes`` block replaces the default set rather than merging into
    # it, so a user can drop an entry (e.g. datasets without users).
    return _join(path, key) in ("features.id_spaces", "planning.vocab_sizes")


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: PyYAML's problem and its 1-based line and column."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(getattr(e, "problem", None) or e).split())


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        return from_dict(tp, value, path)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{path}': expected a list, got {value!r}")
        return [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{path}': expected a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{path}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{path}': expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads ``1e-3`` (no dot) as a string: accept any string that is a finite float.
        number = _float_or_none(value)
        if number is None:
            raise ConfigError(f"config key '{path}': expected a number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, datetime.date):  # YAML reads an unquoted 2017-12-01 as a date
            return value.isoformat()
        if not isinstance(value, str):
            raise ConfigError(f"config key '{path}': expected a string, got {value!r}")
        return value
    return value


def _float_or_none(value: Any) -> Optional[float]:
    """``value`` as a float if it is a number, or a string spelling a finite one; else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None
