"""Sharding a model with TorchRec: fused table optimizers, the planner, DMP, the combined optimizer.

The recipe (as in TorchRec's DLRM example):

1. build the model with its tables on the ``meta`` device (:func:`mdaf_rec.models.factory.build_model`);
2. :func:`apply_sparse_optimizer` marks every table parameter with a fused optimizer applied in backward
   (FBGEMM updates the rows it touched during the backward pass; no dense gradient is materialised);
3. :func:`plan_sharding` runs the TorchRec planner for the topology (or takes a given plan);
4. ``DistributedModelParallel`` materialises and shards the tables and wraps the dense part in DDP;
5. :func:`build_optimizer` combines DMP's fused optimizer with a dense Adam/AdamW (weight decay on weight
   matrices only, see :func:`dense_parameter_groups`).

With ``optimizer.sparse: dense`` (:data:`mdaf_rec.registry.DENSE_TABLES`) step 2 attaches nothing, the
planner is held to ``data_parallel`` tables with the dense kernel (:func:`table_constraints`) and the dense
optimizer trains the tables in a group of their own (``sparse_lr``, ``sparse_eps``, ``sparse_weight_decay``).

The optimizer names are those of :mod:`mdaf_rec.registry`; the classes they stand for are here.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple, Type

import torch
import torch.distributed as dist
from torch import nn
from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.embedding_types import EmbeddingComputeKernel, ShardedEmbeddingModule
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints, Stats
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from mdaf_rec.config import ConfigError, OptimizerConfig, check_sparse_optimizer
from mdaf_rec.managed_ids import ManagedEmbeddingCollectionSharder
from mdaf_rec.registry import DENSE_TABLES

logger = logging.getLogger(__name__)

# optimizer.sparse -> the class TorchRec's fused tables map onto FBGEMM; keys = registry.FUSED_SPARSE_OPTIMIZERS.
SPARSE_OPTIMIZER_CLASSES: Dict[str, Type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
    "adam": torch.optim.Adam,
}
# optimizer.dense -> class (weight decay: L2 for adam, decoupled for adamw); keys = registry.DENSE_OPTIMIZERS.
DENSE_OPTIMIZER_CLASSES: Dict[str, Type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
# Modules whose parameters are never weight-decayed: normalisation scales and learned position tables.
_NO_DECAY_MODULES: Tuple[Type[nn.Module], ...] = (nn.LayerNorm, nn.Embedding)


def table_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Parameters of every ``EmbeddingBagCollection`` / ``EmbeddingCollection`` in ``model``."""
    params: List[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
            params += list(module.parameters())
    return params


def table_configs(model: nn.Module) -> List[Tuple[nn.Module, List[BaseEmbeddingConfig]]]:
    """Every ``EmbeddingBagCollection`` / ``EmbeddingCollection`` in ``model`` with its table configs."""
    found: List[Tuple[nn.Module, List[BaseEmbeddingConfig]]] = []
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            found.append((module, list(module.embedding_bag_configs())))
        elif isinstance(module, EmbeddingCollection):
            found.append((module, list(module.embedding_configs())))
    return found


def apply_sparse_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device) -> None:
    """Attaches the configured fused optimizer to every table parameter (applied in backward).

    Args:
        model: the unsharded model (tables may be on ``meta``).
        cfg: optimizer config (``sparse``, ``sparse_lr``, ``sparse_eps``, ``sparse_weight_decay``; the static
            ``EmbeddingBagCollection`` tables take ``static_sparse_lr`` / ``static_sparse_weight_decay`` where set).
        device: the training device; ``adam`` is refused on CPU, where FBGEMM cannot run it.

    With ``cfg.sparse == "dense"`` nothing is attached: the dense optimizer trains the tables.
    """
    check_sparse_optimizer(cfg, device.type)
    if cfg.sparse == DENSE_TABLES:
        return
    static = [p for m in model.modules() if isinstance(m, EmbeddingBagCollection) for p in m.parameters()]
    static_ids = {id(p) for p in static}
    sequence = [p for p in table_parameters(model) if id(p) not in static_ids]
    static_lr = cfg.sparse_lr if cfg.static_sparse_lr is None else cfg.static_sparse_lr
    static_decay = cfg.sparse_weight_decay if cfg.static_sparse_weight_decay is None else cfg.static_sparse_weight_decay
    for params, lr, weight_decay in ((static, static_lr, static_decay), (sequence, cfg.sparse_lr, cfg.sparse_weight_decay)):
        if params:
            _apply_optimizer_in_backward(optimizer_class=SPARSE_OPTIMIZER_CLASSES[cfg.sparse], params=params,
                                         optimizer_kwargs=_fused_kwargs(cfg.sparse, lr, cfg.sparse_eps, weight_decay))


def _fused_kwargs(sparse: str, lr: float, eps: float, weight_decay: float) -> Dict[str, Any]:
    """FBGEMM's keyword arguments of the fused table optimizer ``sparse``."""
    kwargs: Dict[str, Any] = {"lr": lr}
    if sparse != "sgd":
        kwargs["eps"] = eps
    if weight_decay:
        kwargs["weight_decay"] = weight_decay  # FBGEMM's Adam: decoupled
        if sparse == "rowwise_adagrad":
            # FBGEMM's row-wise Adagrad ignores weight_decay unless a mode is named: L2 adds weight_decay * w to
            # each looked-up row's gradient (rows a batch does not touch are not decayed).
            kwargs["weight_decay_mode"] = WeightDecayMode.L2
    return kwargs


def sharders() -> List[ModuleSharder[nn.Module]]:
    """The sharders DMP and the planner use: TorchRec's defaults (EBC, EC and friends), with the managed-collision
    EC's replaced by :class:`~mdaf_rec.managed_ids.ManagedEmbeddingCollectionSharder` (which runs on CPU)."""
    managed = ManagedEmbeddingCollectionSharder()
    return [managed if s.module_type is managed.module_type else s for s in get_default_sharders()]


def table_constraints(model: nn.Module, cfg: OptimizerConfig) -> Optional[Dict[str, ParameterConstraints]]:
    """Planner constraints the table optimizer needs: with ``optimizer.sparse: dense`` every table of
    ``model`` (unsharded) is ``data_parallel`` with the dense kernel, whose plain weight and dense gradient
    the dense optimizer updates; ``None`` (the planner chooses) for the fused optimizers."""
    if cfg.sparse != DENSE_TABLES:
        return None
    only = ParameterConstraints(sharding_types=[ShardingType.DATA_PARALLEL.value],
                                compute_kernels=[EmbeddingComputeKernel.DENSE.value])
    return {config.name: only for _, configs in table_configs(model) for config in configs}


def check_plan_optimizer(plan: ShardingPlan, cfg: OptimizerConfig, source: str) -> None:
    """Refuses a given plan (``source``: its file) that places a table where ``cfg``'s table optimizer
    cannot train it: with ``optimizer.sparse: dense`` every table must be ``data_parallel`` / ``dense``."""
    if cfg.sparse != DENSE_TABLES:
        return
    wrong = sorted(f"{name} ({p.sharding_type}/{p.compute_kernel})" for module_plan in plan.plan.values()
                   for name, p in module_plan.items()  # type: ignore[attr-defined]
                   if (p.sharding_type, p.compute_kernel) != (ShardingType.DATA_PARALLEL.value,
                                                               EmbeddingComputeKernel.DENSE.value))
    if wrong:
        raise ConfigError(f"{source}: optimizer.sparse=dense trains data_parallel tables with the dense kernel "
                          f"only; the plan has {', '.join(wrong)}")


_GIB = 1024**3


def planner_memory(device: torch.device, local_world_size: int, hbm_gb: Optional[float] = None,
                   ddr_gb: Optional[float] = None) -> Tuple[Optional[int], int]:
    """Per-rank ``(hbm_cap, ddr_cap)`` in bytes for :func:`plan_sharding` (not TorchRec's defaults of 32 GiB
    HBM and 128 GiB DDR): ``hbm_gb`` / ``ddr_gb`` when given, else this machine's: the GPU's total memory
    (``None`` on CPU, where the planner uses no HBM) and the host's physical memory divided by its
    ``local_world_size`` ranks. Logs the caps and where they come from."""
    if hbm_gb is not None:
        hbm, hbm_from = int(hbm_gb * _GIB), "planning.hbm_gb"
    elif device.type == "cuda":
        hbm, hbm_from = torch.cuda.get_device_properties(device).total_memory, torch.cuda.get_device_name(device)
    else:
        hbm, hbm_from = None, "none on CPU"
    if ddr_gb is not None:
        ddr, ddr_from = int(ddr_gb * _GIB), "planning.ddr_gb"
    else:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        ddr, ddr_from = host // local_world_size, f"host memory {host / _GIB:.1f} GiB / {local_world_size} ranks"
    logger.info("planner topology per rank: HBM %s (%s), DDR %.1f GiB (%s)",
                "-" if hbm is None else f"{hbm / _GIB:.1f} GiB", hbm_from, ddr / _GIB, ddr_from)
    return hbm, ddr


def plan_sharding(
    model: nn.Module,
    *,
    world_size: int,
    local_world_size: int,
    compute_device: str,
    batch_size: int,
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
    hbm_cap: Optional[int] = None,
    ddr_cap: Optional[int] = None,
    process_group: Optional[dist.ProcessGroup] = None,
    stats: Optional[List[Stats]] = None,
) -> ShardingPlan:
    """Runs the TorchRec planner.

    Args:
        model: the unsharded model (tables on ``meta``).
        world_size: number of ranks.
        local_world_size: ranks per node.
        compute_device: ``cpu`` or ``cuda``.
        batch_size: per-rank batch size (the planner's cost model uses it).
        constraints: table name -> allowed sharding types / kernels.
        hbm_cap / ddr_cap: per-rank device / host memory in bytes (planner defaults if ``None``).
        process_group: plan collectively (rank 0 plans, everyone gets the same plan) when given.
        stats: receivers of the planner's chosen ``ShardingOption``s with their per-shard storage and
            perf estimates (``mdaf-rec plan``); TorchRec's ``EmbeddingStats`` log table when ``None``.
    Returns:
        The sharding plan.
    """
    topology = Topology(
        world_size=world_size,
        local_world_size=local_world_size,
        compute_device=compute_device,
        hbm_cap=hbm_cap,
        ddr_cap=ddr_cap,
    )
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints, stats=stats)
    if process_group is not None:
        return planner.collective_plan(model, sharders(), process_group)
    return planner.plan(model, sharders())


def shard_model(model: nn.Module, device: torch.device, plan: ShardingPlan) -> DistributedModelParallel:
    """Wraps ``model`` (tables on ``meta``, fused optimizers attached) in DMP with ``plan``."""
    return DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders())


def no_weight_decay_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters weight decay must not pull towards 0: biases (any parameter named ``bias``), every
    other parameter with fewer than 2 dimensions (norm scales, Mamba's ``D``), the parameters of
    ``LayerNorm`` and ``nn.Embedding`` modules, and parameters marked ``_no_weight_decay`` (Mamba's
    ``A_log``, as in mamba-ssm)."""
    chosen: Dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if (name == "bias" or param.ndim < 2 or isinstance(module, _NO_DECAY_MODULES)
                    or getattr(param, "_no_weight_decay", False)):
                chosen[id(param)] = param
    return list(chosen.values())


def dense_parameter_groups(
    params: Iterable[nn.Parameter], no_decay: Iterable[nn.Parameter], weight_decay: float
) -> List[Dict[str, Any]]:
    """``params`` split into a ``weight_decay`` group and a ``0.0`` group (those in ``no_decay``), in order;
    an empty group is left out."""
    skip = {id(p) for p in no_decay}
    params = list(params)
    groups = [
        {"params": [p for p in params if id(p) not in skip], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in skip], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def sharded_table_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Parameters of every sharded TorchRec embedding module in ``model`` (after DMP)."""
    chosen: Dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, ShardedEmbeddingModule):
            chosen.update({id(p): p for p in module.parameters()})
    return list(chosen.values())


def build_optimizer(model: DistributedModelParallel, cfg: OptimizerConfig) -> CombinedOptimizer:
    """DMP's fused table optimizer combined with the dense optimizer over every other parameter, in two
    parameter groups: weight decay ``cfg.weight_decay`` and none (:func:`no_weight_decay_parameters`).
    With ``optimizer.sparse: dense`` the tables are a third group: ``lr`` = ``cfg.sparse_lr``, ``eps`` =
    ``cfg.sparse_eps``, weight decay ``cfg.sparse_weight_decay``."""
    dense_params = dict(in_backward_optimizer_filter(model.named_parameters()))
    no_decay = no_weight_decay_parameters(model)
    tables = {id(p) for p in sharded_table_parameters(model)} if cfg.sparse == DENSE_TABLES else set()
    optimizer_class = DENSE_OPTIMIZER_CLASSES[cfg.dense]

    def dense(params: List[nn.Parameter]) -> torch.optim.Optimizer:
        groups = dense_parameter_groups([p for p in params if id(p) not in tables], no_decay, cfg.weight_decay)
        table_group = [p for p in params if id(p) in tables]
        if table_group:
            groups.append({"params": table_group, "lr": cfg.sparse_lr, "eps": cfg.sparse_eps,
                           "weight_decay": cfg.sparse_weight_decay})
        return optimizer_class(groups, lr=cfg.lr)

    dense_optimizer: KeyedOptimizer = KeyedOptimizerWrapper(dense_params, dense)
    return CombinedOptimizer([model.fused_optimizer, dense_optimizer])
