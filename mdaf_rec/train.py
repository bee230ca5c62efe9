"""The training recipe: ``mdaf-rec train`` and ``mdaf-rec eval``.

One story, read top to bottom (:func:`train`): set up the process group, read the data's vocabularies,
build the model with its tables on ``meta``, attach the fused table optimizer, plan and shard with DMP,
then per epoch: train through ``TrainPipelineSparseDist``, evaluate on validation, checkpoint, and stop
early when validation AUC stops improving; finally score validation and test with the best checkpoint
and write ``metrics.json``. The same code runs as 1 process, ``torchrun --nproc_per_node N`` or N nodes.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingPlan
from tqdm import tqdm

from mdaf_rec import checkpoint as ckpt
from mdaf_rec.config import Config, dump_config, load_config
from mdaf_rec.data.batch import Batch
from mdaf_rec.data.dataset import Dataset
from mdaf_rec.data.loader import BatchLoader
from mdaf_rec.data.vocab import VocabMismatchError, Vocabularies
from mdaf_rec.distributed import DistEnv, init_distributed
from mdaf_rec.errors import UserError
from mdaf_rec.features import FeatureSpec
from mdaf_rec.metrics import MetricAccumulator
from mdaf_rec.models.ctr import CTRTrain
from mdaf_rec.models.factory import build_model
from mdaf_rec.plan_io import load_plan, plan_world_size, save_plan
from mdaf_rec.sharding import (
    apply_sparse_optimizer,
    build_optimizer,
    plan_sharding,
    shard_model,
    table_parameters,
)

logger = logging.getLogger(__name__)

VOCAB_DIR = "vocab"
PLAN_FILE = "plan.json"


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (non-finite loss, incompatible checkpoint, ...)."""


@dataclass
class Session:
    """Everything a training or evaluation run holds."""

    cfg: Config
    env: DistEnv
    run_dir: Path
    dataset: Dataset
    vocabs: Vocabularies
    spec: FeatureSpec
    model: DistributedModelParallel
    optimizer: Any
    params: Dict[str, int]
    plan: ShardingPlan


# --------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------


def setup_logging(run_dir: Optional[Path], rank: int) -> None:
    """INFO logs on rank 0 (others warn only), also to ``RUN_DIR/train.log``."""
    level = logging.INFO if rank == 0 else logging.WARNING
    handlers: List[logging.Handler] = [logging.StreamHandler()]
    if run_dir is not None and rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    # TorchRec logs every pipeline fill/drain at INFO; keep its warnings only.
    logging.getLogger("torchrec").setLevel(logging.WARNING)


def open_session(
    cfg: Config, run_dir: Path, env: DistEnv, vocabs: Optional[Vocabularies] = None, plan: Optional[ShardingPlan] = None
) -> Session:
    """Builds the sharded model and its optimizer for ``cfg`` on the data at ``cfg.data.path``.

    Args:
        cfg: the resolved config.
        run_dir: run directory.
        env: this process's place in the job.
        vocabs: vocabularies to use (evaluation of a saved run); built/reused from the data otherwise.
        plan: sharding plan; planned by the TorchRec planner for this topology when ``None``.
    """
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    dataset = Dataset.open(cfg.data.path)
    if vocabs is None:
        vocabs = _shared_vocabularies(dataset, cfg, env)
    spec = FeatureSpec.build(cfg.features, vocabs.sizes)
    torch.manual_seed(cfg.train.seed)
    model = build_model(spec, cfg.model, table_device="meta", dense_device=env.device)
    train_module = CTRTrain(model, tri_bce=cfg.model.dcnv3.tri_bce)
    params = _count_params(train_module)
    apply_sparse_optimizer(train_module, cfg.optimizer, env.device)
    per_rank_batch = max(1, cfg.train.batch_size // env.world_size)
    if plan is None:
        plan = plan_sharding(
            train_module,
            world_size=env.world_size,
            local_world_size=env.local_world_size,
            compute_device=env.device.type,
            batch_size=per_rank_batch,
            process_group=dist.group.WORLD,
        )
    dmp = shard_model(train_module, env.device, plan)
    # Dropout masks differ per rank but are reproducible for a given (seed, rank).
    torch.manual_seed(cfg.train.seed + 7919 * env.rank)
    optimizer = build_optimizer(dmp, cfg.optimizer)
    logger.info("sharding plan:\n%s", plan)
    return Session(cfg, env, run_dir, dataset, vocabs, spec, dmp, optimizer, params, plan)


def _shared_vocabularies(dataset: Dataset, cfg: Config, env: DistEnv) -> Vocabularies:
    """Rank 0 builds (or reuses) the vocabularies first; the other ranks then load the same files."""
    cache = cfg.data.vocab_dir
    if env.rank == 0:
        vocabs = Vocabularies.load_or_build(dataset, cfg.features, cache_dir=cache)
    dist.barrier()
    if env.rank != 0:
        vocabs = Vocabularies.load_or_build(dataset, cfg.features, cache_dir=cache)
    return vocabs


def _count_params(module: torch.nn.Module) -> Dict[str, int]:
    tables = {id(p) for p in table_parameters(module)}
    table = sum(p.numel() for p in module.parameters() if id(p) in tables)
    dense = sum(p.numel() for p in module.parameters() if id(p) not in tables)
    return {"tables": table, "dense": dense, "total": table + dense}


def _loader(session: Session, split: str, *, epoch: int, train: bool, start_batch: int = 0) -> BatchLoader:
    cfg = session.cfg
    return BatchLoader(
        session.dataset,
        split,
        session.spec,
        session.vocabs,
        cfg.train.batch_size if train else cfg.train.eval_batch_size,
        rank=session.env.rank,
        world_size=session.env.world_size,
        shuffle=train,
        seed=cfg.train.seed,
        epoch=epoch,
        drop_last=False,
        num_workers=cfg.data.num_workers,
        start_batch=start_batch,
        timezone=cfg.features.timezone,
    )


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def evaluate(session: Session, split: str, collect_scores: bool = False) -> Dict[str, Any]:
    """Scores ``split`` with the current weights; metrics are aggregated over all ranks.

    Args:
        session: the session.
        split: ``train``, ``val`` or ``test``.
        collect_scores: also return this rank's ``row_index`` and probabilities (for parity checks).
    Returns:
        ``auc``, ``logloss``, ``gauc``, ``calibration``, ... and ``gate`` for MDAF models.
    """
    model = session.model
    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    rows: List[torch.Tensor] = []
    scores: List[torch.Tensor] = []
    loader = _loader(session, split, epoch=0, train=False)
    bar = tqdm(loader, desc=f"eval {split}", disable=session.env.rank != 0, leave=False, unit="batch")
    with torch.no_grad():
        for batch in bar:
            batch = batch.to(session.env.device, non_blocking=True)
            _, out = model(batch)
            probs = torch.sigmoid(out.logit).cpu()
            gate = out.gate.cpu() if out.gate is not None else None
            acc.update(probs, batch.labels.cpu(), batch.user_index.cpu(), gate)
            if collect_scores:
                rows.append(batch.row_index.cpu())
                scores.append(probs)
    result = acc.compute(dist.group.WORLD)
    if collect_scores:
        result["row_index"] = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        result["scores"] = torch.cat(scores) if scores else torch.zeros(0)
    model.train(was_training)
    return result


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def train(cfg: Config, run_dir: Path, resume: bool = False, plan_file: Optional[Path] = None) -> Dict[str, Any]:
    """Trains ``cfg`` into ``run_dir`` and returns the final metrics (also in ``metrics.json``).

    Args:
        cfg: the resolved config.
        run_dir: run directory (created).
        resume: continue from the run's ``last`` checkpoint (exactly: weights, optimizer state, data
            position and RNG are restored).
        plan_file: a sharding plan written by ``mdaf-rec plan --json``; planned here when ``None``.
    """
    env = init_distributed()
    setup_logging(run_dir, env.rank)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    vocabs = _shared_vocabularies(Dataset.open(cfg.data.path), cfg, env)
    if resume:  # refuse another dataset's vocabularies before anything is built on them
        last = ckpt.checkpoint_path(run_dir, "last")
        try:
            ckpt.check_vocabularies(last, vocabs)
        except VocabMismatchError as e:
            raise TrainingError(f"the dataset at {cfg.data.path} has other vocabularies than checkpoint {last}: {e}") from None
    session = open_session(cfg, run_dir, env, vocabs=vocabs, plan=_run_plan(run_dir, env, plan_file, resume))
    logger.info(
        "model %s: %s parameters (%s in tables), world size %d (%s), data %s",
        cfg.model.name, f"{session.params['total']:,}", f"{session.params['tables']:,}", env.world_size,
        env.backend, cfg.data.path,
    )
    if env.is_main:
        save_plan(session.plan, env.world_size, run_dir / PLAN_FILE)
        session.vocabs.save(run_dir / VOCAB_DIR)
        oov = session.vocabs.oov_rates(session.dataset)
        logger.info("out-of-vocabulary rates per split and feature: %s", json.dumps(oov))

    state = {"epochs_done": 0, "step": 0, "best_auc": -math.inf, "best_epoch": 0, "bad_epochs": 0, "train_seconds": 0.0,
             "train_samples": 0}
    if resume:
        state = _resume(session)
    pipeline = TrainPipelineSparseDist(session.model, session.optimizer, env.device) if cfg.train.pipeline else None

    for epoch in range(state["epochs_done"], cfg.train.epochs):
        started = time.perf_counter()
        epoch_loss, steps, samples = _train_epoch(session, pipeline, epoch, state)
        state["train_seconds"] += time.perf_counter() - started
        state["train_samples"] += samples
        if pipeline is not None:
            pipeline.detach()
        val = evaluate(session, "val")
        state["epochs_done"] = epoch + 1
        improved = val["auc"] > state["best_auc"]
        if improved:
            state.update(best_auc=val["auc"], best_epoch=epoch + 1, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        record = {
            "epoch": epoch + 1,
            "step": state["step"],
            "train_loss": epoch_loss,
            "samples_per_sec": samples / max(time.perf_counter() - started, 1e-9),
            "val": _headline(val),
        }
        if env.is_main:
            with open(run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        logger.info(
            "epoch %d: train loss %.5f, val auc %.5f gauc %.5f logloss %.5f%s",
            epoch + 1, epoch_loss, val["auc"], val["gauc"], val["logloss"], " (best)" if improved else "",
        )
        state["vocab_fingerprint"] = session.vocabs.fingerprint
        state["world_size"] = env.world_size
        ckpt.save_checkpoint(run_dir, f"epoch_{epoch + 1}", _app_state(session), state, is_best=improved)
        if state["bad_epochs"] >= cfg.train.patience:
            logger.info("early stopping: no better validation AUC for %d epochs", cfg.train.patience)
            break

    final = _final_metrics(session, state)
    if env.is_main:
        (run_dir / "metrics.json").write_text(json.dumps(final, indent=2))
        _plots(run_dir, final)
    return final


def _run_plan(run_dir: Path, env: DistEnv, plan_file: Optional[Path], resume: bool) -> Optional[ShardingPlan]:
    """The plan to shard with: the given file, else (when resuming with the same world size) the run's
    own ``plan.json``, else ``None`` (the planner decides). A resumed run keeps its sharding so that
    its optimizer state (fused for sharded tables, dense for data-parallel ones) loads as saved."""
    if plan_file is not None:
        return load_plan(plan_file, env.world_size)
    own = run_dir / PLAN_FILE
    if resume and own.exists() and plan_world_size(own) == env.world_size:
        return load_plan(own, env.world_size)
    return None


def _train_epoch(
    session: Session, pipeline: Optional[TrainPipelineSparseDist], epoch: int, state: Dict[str, Any]
) -> tuple[float, int, int]:
    """One epoch; returns (mean loss, steps, global samples)."""
    cfg = session.cfg
    model = session.model
    model.train()
    loader = _loader(session, "train", epoch=epoch, train=True)
    total = len(loader) if cfg.train.max_steps_per_epoch is None else min(len(loader), cfg.train.max_steps_per_epoch)
    batches: Iterator[Batch] = itertools.islice(iter(loader), total)
    bar = tqdm(total=total, desc=f"epoch {epoch + 1}", disable=session.env.rank != 0, unit="step")
    loss_sum, steps, samples = 0.0, 0, 0
    started = time.perf_counter()
    while True:
        if pipeline is not None:
            try:
                out = pipeline.progress(batches)
            except StopIteration:
                break
            loss = out.loss
            batch_rows = int(out.labels.shape[0])
        else:
            batch = next(batches, None)
            if batch is None:
                break
            batch = batch.to(session.env.device, non_blocking=True)
            session.optimizer.zero_grad()
            loss, out = model(batch)
            loss.backward()
            session.optimizer.step()
            batch_rows = batch.batch_size
        state["step"] += 1
        value = float(loss)
        if not math.isfinite(value):
            raise TrainingError(
                f"non-finite loss {value} at step {state['step']} (epoch {epoch + 1}, batch {steps + 1}); "
                f"training stopped, the last good checkpoint is kept in {session.run_dir / 'checkpoints'}"
            )
        loss_sum += value
        steps += 1
        samples += batch_rows * session.env.world_size
        bar.update(1)
        if steps % cfg.train.log_every == 0 or steps == total:
            rate = samples / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(loss=f"{loss_sum / steps:.4f}", samples_per_s=f"{rate:,.0f}")
            logger.debug("epoch %d step %d loss %.5f %.0f samples/s", epoch + 1, steps, loss_sum / steps, rate)
    bar.close()
    mean_loss = torch.tensor([loss_sum, float(steps)], dtype=torch.float64)
    dist.all_reduce(mean_loss)
    return float(mean_loss[0] / max(mean_loss[1], 1.0)), steps, samples


def _app_state(session: Session) -> Dict[str, Any]:
    return {"model": session.model.state_dict(), "optim": session.optimizer.state_dict()}


def _resume(session: Session) -> Dict[str, Any]:
    path = ckpt.checkpoint_path(session.run_dir, "last")
    _init_optimizer_state(session)
    app_state = _app_state(session)
    # The optimizer entry loads partially: parameters that never received a gradient (e.g. DCNv3's own
    # logit layers inside MDAF without Tri-BCE) have no Adam state in the checkpoint, and keep the
    # placeholder state init_state gave them, which no step ever reads. Under another world size the
    # optimizer state of tables whose sharding type changed (fused <-> data_parallel) restarts too.
    state = ckpt.load_checkpoint(path, app_state, partial=("optim",))
    if state.get("world_size") != session.env.world_size:
        logger.warning(
            "resumed a %s-process checkpoint with %d processes: weights are resharded exactly; optimizer state of "
            "tables whose sharding type changed (fused <-> data_parallel) restarts",
            state.get("world_size"), session.env.world_size,
        )
    session.model.load_state_dict(app_state["model"])
    session.optimizer.load_state_dict(_with_param_groups(app_state["optim"], session.optimizer.state_dict()))
    logger.info("resumed from %s (epoch %d, step %d)", path, state["epochs_done"], state["step"])
    return state


def _load_weights(session: Session, path: Path) -> None:
    """Loads the model weights (not the optimizer state) of a checkpoint."""
    app_state = {"model": session.model.state_dict()}
    ckpt.load_checkpoint(path, app_state)
    session.model.load_state_dict(app_state["model"])


def _init_optimizer_state(session: Session) -> None:
    """Creates the dense optimizer's lazy state so a checkpoint can be loaded into it in place."""
    for _, optim in session.optimizer.optimizers:
        if optim is not session.model.fused_optimizer:
            optim.init_state()


def _with_param_groups(loaded: Dict[str, Any], current: Dict[str, Any]) -> Dict[str, Any]:
    """Loaded optimizer tensors plus the current (config-derived) ``param_groups``."""
    merged = dict(current)
    merged["state"] = loaded.get("state", current.get("state", {}))
    return merged


def _headline(metrics: Dict[str, Any]) -> Dict[str, Any]:
    keys = ("auc", "logloss", "gauc", "calibration", "ctr", "pred_ctr", "count")
    return {k: metrics[k] for k in keys if k in metrics}


def _final_metrics(session: Session, state: Dict[str, Any]) -> Dict[str, Any]:
    """Scores validation and test with the best checkpoint."""
    path = ckpt.checkpoint_path(session.run_dir, "best")
    _load_weights(session, path)
    val = evaluate(session, "val")
    test = evaluate(session, "test")
    final: Dict[str, Any] = {
        "model": session.cfg.model.name,
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epochs_done"],
        "steps": state["step"],
        "val": _headline(val),
        "test": _headline(test),
        "samples_per_sec": state["train_samples"] / max(state["train_seconds"], 1e-9),
        "params": session.params,
        "world_size": session.env.world_size,
    }
    if "gate" in test:
        final["gate"] = test["gate"]
    splits = session.dataset.meta.get("splits", {})
    ceiling = {s: {k: v for k, v in splits[s].items() if k.startswith("bayes")} for s in ("val", "test") if s in splits}
    if any(ceiling.values()):
        final["bayes_ceiling"] = ceiling
    return final


def _plots(run_dir: Path, final: Dict[str, Any]) -> None:
    from mdaf_rec.plots import plot_gate_histogram, plot_training_curves

    plot_training_curves(run_dir / "metrics.jsonl", run_dir / "training_curves.png")
    if "gate" in final:
        plot_gate_histogram(final["gate"], run_dir / "gate_histogram.png", title=f"{final['model']}: fusion gate (test)")


# --------------------------------------------------------------------------------------------------
# Re-scoring a saved run
# --------------------------------------------------------------------------------------------------


def eval_run(run_dir: Path, data: Optional[str], split: str, which: str = "best") -> Dict[str, Any]:
    """Re-scores ``split`` of ``data`` (default: the run's data) with a saved checkpoint.

    Ids are mapped through the run's own vocabularies (unknown ids → OOV), so another dataset in the
    canonical schema can be scored with a trained run.
    """
    env = init_distributed()
    setup_logging(None, env.rank)
    cfg = load_config(run_dir / "config.yaml")
    if data is not None:
        cfg.data.path = data
    vocabs = Vocabularies.load(run_dir / VOCAB_DIR)
    session = open_session(cfg, run_dir, env, vocabs=vocabs)
    path = ckpt.checkpoint_path(run_dir, which)
    ckpt.check_vocabularies(path, vocabs)
    _load_weights(session, path)
    result = evaluate(session, split)
    result["checkpoint"] = str(path)
    result["split"] = split
    return result
