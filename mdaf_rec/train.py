"""The training recipe: ``mdaf-rec train`` and ``mdaf-rec eval``.

One story, read top to bottom (:func:`train`): set up the process group, take the run directory's lock
and decide whether to start afresh or resume (before anything is written), read the data's
vocabularies, build the model with its tables on ``meta``, attach the fused table optimizer, plan and
shard with DMP, then per epoch: train through ``TrainPipelineSparseDist`` (checkpointing inside the
epoch if asked), evaluate on validation, checkpoint, and stop early when validation AUC stops
improving; finally score validation and test with the best checkpoint and write ``metrics.json``. The
same code runs as 1 process, ``torchrun --nproc_per_node N`` or N nodes, and a restarted job (the
launcher re-running the same command) continues from its last checkpoint. A new run may start from another
run's checkpoint instead of a fresh initialisation (``train.init_from``: :func:`warm_start_session`, its tables
grown by the new data's ids) and train on some local days of the training split only (``data.from_date`` /
``data.to_date``: :func:`_training_dataset`).

The pieces scripts and tests reuse: :func:`open_session` (``training=False``: no optimizer state),
:meth:`Session.loader`, :func:`train_steps` (the one step path, a TorchRec pipeline), :func:`predictions`
and :func:`evaluate`. Loss, metrics and samples/s also go to TensorBoard (:mod:`mdaf_rec.monitoring`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import pyarrow.compute as pc
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.distributed.train_pipeline.train_pipelines import TrainPipeline
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer
from tqdm import tqdm

from mdaf_rec import checkpoint as ckpt
from mdaf_rec.config import Config, check_managed_world_size, dump_config, load_config, to_dict
from mdaf_rec.data.batch import Batch
from mdaf_rec.data.dataset import Dataset, DatasetError, open_parquet, recorded_timezone
from mdaf_rec.data.days import day_slice
from mdaf_rec.data.schema import LABEL, META_FILE
from mdaf_rec.data.loader import BatchLoader
from mdaf_rec.data.validate import check_timestamp_ranges
from mdaf_rec.data.validated import validate_once
from mdaf_rec.data.vocab import VocabMismatchError, Vocabularies, column_rules, derived_folders
from mdaf_rec.distributed import DistEnv, check_gpu_request, init_distributed
from mdaf_rec.errors import UserError
from mdaf_rec.features import USER_SPACE, FeatureSpec
from mdaf_rec.interrupts import stoppable
from mdaf_rec.logs import attach_log_file, setup_logging
from mdaf_rec.managed_ids import check_managed_settings, check_remapping_world_size, managed_fingerprint
from mdaf_rec.metrics import format_metric
from mdaf_rec.models.ctr import CTRTrainOutput
from mdaf_rec.models.embeddings import ManagedIdArch
from mdaf_rec.monitoring import TensorBoardLog
from mdaf_rec.ops.cuda_kernels import log_mamba_backend
from mdaf_rec.plan_io import check_plan, load_plan, plan_world_size, save_plan
from mdaf_rec.profiles import FinalProfile, user_activity
from mdaf_rec.run_dir import RunDir, RunDirError, RunLock, Start, decide_start
from mdaf_rec.sharding import (build_optimizer, check_plan_optimizer, plan_sharding, planner_memory, shard_model,
                               table_constraints, table_parameters)
from mdaf_rec.streaming_metrics import make_accumulator, metrics_mode
from mdaf_rec.train_state import TrainState
from mdaf_rec.trainable import build_train_module
from mdaf_rec.warm_start import (InitSource, check_id_mapping, load_model_state, load_optimizer_state,
                                 resolve_source, source_vocabularies, table_key_rule)

logger = logging.getLogger(__name__)


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (non-finite loss, incompatible checkpoint, ...)."""


@dataclass
class Session:
    """Everything a training or evaluation run holds (``optimizer`` is ``None`` in an evaluation session)."""

    cfg: Config
    env: DistEnv
    run_dir: Path
    dataset: Dataset
    vocabs: Optional[Vocabularies]  # None under features.id_mapping: managed
    spec: FeatureSpec
    model: DistributedModelParallel
    optimizer: Optional[CombinedOptimizer]
    params: Dict[str, int]
    plan: ShardingPlan

    def loader(self, split: str, *, epoch: int = 0, train: bool = False, start_batch: int = 0) -> BatchLoader:
        """This rank's batches of ``split``: training batches (``train.batch_size``, shuffled per ``epoch``,
        from global batch ``start_batch`` on) or evaluation batches (``train.eval_batch_size``, in order);
        in pinned memory on a CUDA device."""
        cfg = self.cfg
        return BatchLoader(
            self.dataset,
            split,
            self.spec,
            self.vocabs,
            cfg.train.batch_size if train else cfg.train.eval_batch_size,
            rank=self.env.rank,
            world_size=self.env.world_size,
            shuffle=train,
            seed=cfg.train.seed,
            epoch=epoch,
            drop_last=False,
            num_workers=cfg.data.num_workers,
            start_batch=start_batch,
            timezone=cfg.features.timezone,
            pin_memory=self.env.device.type == "cuda",
            sharding=cfg.data.sharding,
            validated=True,  # by open_session
            oov_dropout=cfg.train.oov_dropout if train else None,
        )


# --------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------


def open_session(
    cfg: Config,
    run_dir: Path,
    env: DistEnv,
    vocabs: Optional[Vocabularies] = None,
    plan: Union[ShardingPlan, Path, None] = None,
    *,
    training: bool = True,
    dataset: Optional[Dataset] = None,
) -> Session:
    """Builds the sharded model (and, for training, its optimizers) for ``cfg`` on the data at ``cfg.data.path``.

    Args:
        cfg: the resolved config.
        run_dir: run directory.
        env: this process's place in the job.
        vocabs: vocabularies to use (evaluation of a saved run); built/reused from the data otherwise (none under
            ``features.id_mapping: managed``).
        plan: sharding plan, or a plan file written by ``mdaf-rec plan --json`` (read and checked against this
            model's tables and this job); planned by the TorchRec planner for this topology when ``None``
            (per-rank memory: ``planning.hbm_gb`` / ``planning.ddr_gb``, else this machine's,
            :func:`~mdaf_rec.sharding.planner_memory`).
        training: attach the fused table optimizer and build the dense one; an evaluation session
            (``False``) has neither, so no optimizer state is allocated.
        dataset: the data, opened (a day slice of ``cfg.data.path``, :func:`_training_dataset`); opened from
            ``cfg.data.path`` when ``None``.
    """
    dataset = Dataset.open(cfg.data.path) if dataset is None else dataset
    check_managed_world_size(cfg.features, env.world_size)
    _validated(dataset, cfg, env)
    if vocabs is None:
        vocabs = _shared_vocabularies(dataset, cfg, env)
    torch.manual_seed(cfg.train.seed)
    sizes = vocabs.sizes if vocabs is not None else {}
    spec, train_module = build_train_module(cfg, sizes, table_device="meta", dense_device=env.device,
                                            compute_device=env.device, with_sparse_optimizer=training)
    params = _count_params(train_module)
    per_rank_batch = max(1, cfg.train.batch_size // env.world_size)
    if isinstance(plan, Path):
        source, plan = plan, load_plan(plan, env.world_size)
        check_plan(plan, train_module, env.world_size, env.device.type, str(source))
        check_plan_optimizer(plan, cfg.optimizer, str(source))
    if plan is None:
        hbm_cap, ddr_cap = planner_memory(env.device, env.local_world_size, cfg.planning.hbm_gb, cfg.planning.ddr_gb)
        plan = plan_sharding(
            train_module,
            world_size=env.world_size,
            local_world_size=env.local_world_size,
            compute_device=env.device.type,
            batch_size=per_rank_batch,
            constraints=table_constraints(train_module, cfg.optimizer),
            hbm_cap=hbm_cap,
            ddr_cap=ddr_cap,
            process_group=dist.group.WORLD,
        )
    dmp = shard_model(train_module, env.device, plan)
    for module in dmp.modules():
        if isinstance(module, ManagedIdArch):
            module.size_history_buffers(cfg.train.batch_size)
    # data_parallel tables run FBGEMM's dense lookup, whose autograd comes from a Python-level wrapper, not a
    # registered autograd kernel; its backward works (tests/test_train_step.py: their rows change), so the
    # "may lead to silently incorrect behavior" warning it raises at every backward is silenced here.
    warnings.filterwarnings(
        "ignore", message="fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered",
        category=UserWarning,
    )
    # Dropout masks differ per rank but are reproducible for a given (seed, rank).
    torch.manual_seed(cfg.train.seed + 7919 * env.rank)
    optimizer = build_optimizer(dmp, cfg.optimizer) if training else None
    logger.info("sharding plan:\n%s", plan)
    if "mamba" in cfg.model.name:
        log_mamba_backend(env.device.type)
    return Session(cfg, env, run_dir, dataset, vocabs, spec, dmp, optimizer, params, plan)


def _validated(dataset: Dataset, cfg: Config, env: DistEnv) -> None:
    """Rank 0 validates the split files once (a file whose pass is recorded is not read again); the other ranks
    wait, and every rank's loaders then only cast (``BatchLoader(validated=True)``)."""
    if env.rank == 0:
        validate_once(dataset, column_rules(cfg.features), derived_folders(dataset, cfg.data.vocab_dir))
    dist.barrier()


def _shared_vocabularies(dataset: Dataset, cfg: Config, env: DistEnv) -> Optional[Vocabularies]:
    """Rank 0 builds (or reuses) the vocabularies first; the other ranks then load the same files. ``None`` under
    ``features.id_mapping: managed`` (no vocabulary pass: the model remaps raw ids)."""
    if cfg.features.id_mapping == "managed":
        return None
    cache = cfg.data.vocab_dir
    if env.rank == 0:
        vocabs = Vocabularies.load_or_build(dataset, cfg.features, cache_dir=cache)
    dist.barrier()
    if env.rank != 0:
        vocabs = Vocabularies.load_or_build(dataset, cfg.features, cache_dir=cache)
    return vocabs


def _id_fingerprint(cfg: Config, vocabs: Optional[Vocabularies]) -> str:
    """What a checkpoint records of how its ids map to rows: the vocabularies' fingerprint, or under ``managed``
    the managed settings' (:func:`~mdaf_rec.managed_ids.managed_fingerprint`)."""
    return vocabs.fingerprint if vocabs is not None else managed_fingerprint(cfg.features)


def _check_id_mapping(path: Path, cfg: Config, vocabs: Optional[Vocabularies]) -> None:
    """Refuses checkpoint ``path`` unless its ids map to rows as ``vocabs`` (``vocab``) or the managed settings of
    ``cfg`` (``managed``, where the vocabulary check does not apply) say."""
    if vocabs is None:
        check_managed_settings(ckpt.read_state(path).get("vocab_fingerprint"), cfg.features, f"checkpoint {path}")
        return
    try:
        ckpt.check_vocabularies(path, vocabs)
    except VocabMismatchError as e:
        raise TrainingError(f"the dataset at {cfg.data.path} has other vocabularies than checkpoint {path}: {e}") from None


def _training_dataset(dataset: Dataset, cfg: Config, env: DistEnv) -> Dataset:
    """``dataset``, or with ``data.from_date`` / ``data.to_date`` its day slice (:func:`~mdaf_rec.data.days.day_slice`):
    rank 0 writes (or reuses) it, every rank learns of a refusal, the other ranks then open it."""
    if cfg.data.from_date is None and cfg.data.to_date is None:
        return dataset
    outcome: List[Any] = [None]
    if env.is_main:
        try:
            sliced = day_slice(dataset, cfg.data.from_date, cfg.data.to_date, cfg.features.timezone, cfg.data.vocab_dir)
            outcome[0] = str(sliced.root)
        except UserError as e:
            outcome[0] = {"error": str(e)}
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], dict):
        raise DatasetError(outcome[0]["error"])
    return sliced if env.is_main else Dataset.open(outcome[0])


def _run_vocabularies(dataset: Dataset, cfg: Config, env: DistEnv, run: RunDir, start: Start,
                      source: Optional[InitSource]) -> Optional[Vocabularies]:
    """The vocabularies the run's tables are indexed by: the data's; a warm start's source run's grown by the
    data's new ids (:meth:`~mdaf_rec.data.vocab.Vocabularies.grown`); a resumed warm-started run's own
    (``RUN_DIR/vocab/``, written when it started: its source may have changed since). ``None`` under
    ``features.id_mapping: managed``: the remapping is model state (a warm start loads it with the tables)."""
    if cfg.features.id_mapping == "managed":
        return None
    if start is Start.RESUME and cfg.train.init_from:
        return Vocabularies.load(run.vocab)
    vocabs = _shared_vocabularies(dataset, cfg, env)
    if source is None:
        return vocabs
    try:
        return source_vocabularies(source).grown(vocabs, str(source.run.vocab))
    except VocabMismatchError as e:
        raise TrainingError(f"train.init_from {source.given!r}: {e}") from None


def warm_start_session(session: Session, source: InitSource) -> Dict[str, Any]:
    """Loads the source checkpoint's model state (and, with ``train.init_optimizer``, its optimizer state where
    shapes allow) into the new session (:mod:`mdaf_rec.warm_start`); returns what the run records of it."""
    is_table = table_key_rule(session.spec)
    if session.cfg.train.init_optimizer:
        _init_optimizer_state(session)  # first: its dummy step moves weights (weight decay), which are loaded next
    grown = load_model_state(source, session.model, is_table)
    origin = ckpt.read_state(source.checkpoint)
    record: Dict[str, Any] = {
        "from": source.given, "checkpoint": str(source.checkpoint.resolve()), "epochs_done": origin.get("epochs_done"),
        "step": origin.get("step"), "vocab_fingerprint": origin.get("vocab_fingerprint"), "grown_tables": grown,
        "optimizer": None,
    }
    if session.cfg.train.init_optimizer:
        state = session.optimizer.state_dict()
        taken, fresh = load_optimizer_state(source, state, is_table)
        session.optimizer.load_state_dict(state)
        record["optimizer"] = {"taken": taken, "fresh": fresh}
    logger.info("warm start from %s (epoch %s, step %s): %d tables grew %s; optimizer state %s", source.checkpoint,
                record["epochs_done"], record["step"], len(grown), grown,
                "taken where shapes allow " + str(record["optimizer"]) if record["optimizer"] else "fresh")
    return record


def _count_params(module: torch.nn.Module) -> Dict[str, int]:
    tables = {id(p) for p in table_parameters(module)}
    table = sum(p.numel() for p in module.parameters() if id(p) in tables)
    dense = sum(p.numel() for p in module.parameters() if id(p) not in tables)
    return {"tables": table, "dense": dense, "total": table + dense}


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def predictions(session: Session, split: str) -> Iterator[Tuple[Batch, CTRTrainOutput]]:
    """This rank's evaluation batches of ``split`` (on the device) with the model's outputs, current weights,
    eval mode, no gradients; the model's train/eval mode is restored when the iteration ends."""
    model = session.model
    was_training = model.training
    model.eval()
    loader = session.loader(split)
    bar = tqdm(loader, desc=f"eval {split}", disable=session.env.rank != 0, leave=False, unit="batch")
    try:
        with torch.no_grad():
            for batch in bar:
                batch = batch.to(session.env.device, non_blocking=True)
                _, out = model(batch)
                yield batch, out
    finally:
        model.train(was_training)


def evaluate(session: Session, split: str, profile: bool = False) -> Dict[str, Any]:
    """Scores ``split`` with the current weights; metrics are aggregated over all ranks, exactly or streaming
    (``eval.metrics``; ``null``: by the split's size, :func:`mdaf_rec.streaming_metrics.metrics_mode`).

    Args:
        session: the session.
        split: ``train``, ``val`` or ``test``.
        profile: also compute the reliability table and, for MDAF, the gate by history length and user
            activity (:mod:`mdaf_rec.profiles`; final scoring only: one more ``GROUP BY`` over the training split).
    Returns:
        ``auc``, ``logloss``, ``ne``, ``gauc``, ``calibration``, ... and ``gate`` for MDAF models; with
        ``profile``, ``reliability`` and (MDAF) ``gate_profile``.
    """
    rows = session.dataset.num_rows(split)
    mode = metrics_mode(session.cfg.eval.metrics, rows)
    logger.info("evaluating %s (%s rows): %s metrics%s", split, f"{rows:,}", mode,
                "" if session.cfg.eval.metrics else " (eval.metrics: null chooses by the split's size)")
    acc = make_accumulator(mode, session.cfg.eval.auc_bins)  # update() leaves everything on the device
    final = _final_profile(session, split) if profile else None
    history_key = session.spec.sequence_spaces[0].history_key
    for batch, out in predictions(session, split):
        probs = torch.sigmoid(out.logit)
        acc.update(probs, batch.labels, batch.user_id, out.gate)
        if final is not None:
            history = batch.sequence_features[history_key].lengths() if out.gate is not None else None
            final.update(probs, batch.labels, out.gate, history, batch.user_id)
    result = acc.compute(dist.group.WORLD)
    if final is not None:
        result.update(final.compute(dist.group.WORLD))
    return result


def _final_profile(session: Session, split: str) -> FinalProfile:
    """An empty :class:`FinalProfile` for ``split``, with the training rows of its users when the data has users."""
    space = session.cfg.features.id_spaces.get(USER_SPACE)
    activity = None
    if space is not None:
        dataset = session.dataset
        activity = user_activity(dataset.split_files("train"), dataset.split_files(split), space.column)
    return FinalProfile(activity, session.env.device)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def train(
    cfg: Config,
    run_dir: Path,
    resume: bool = False,
    plan_file: Optional[Path] = None,
    overwrite: bool = False,
    verbose: bool = False,
) -> Dict[str, Any]:
    """Trains ``cfg`` into ``run_dir`` and returns the final metrics (also in ``metrics.json``).

    Args:
        cfg: the resolved config.
        run_dir: run directory. A new or empty folder starts a run; a run directory of the same config
            with a checkpoint is resumed from it (as after a crash or a launcher restart); anything else is
            refused before a file is written.
        resume: insist on resuming (an error if there is nothing to resume).
        plan_file: a sharding plan written by ``mdaf-rec plan --json``; planned here when ``None``.
        overwrite: start afresh in a run directory this project marked, deleting the run's own files (never
            other files, never through a link) first; refused for any other folder
            (:func:`mdaf_rec.run_dir.decide_start`).
        verbose: also show third-party log lines and warnings.
    """
    check_gpu_request()
    env = init_distributed()
    _set_threads(cfg, env)
    _allow_tf32(env)
    buffered = setup_logging(env.rank, verbose, buffer_for_file=True)
    run = RunDir(run_dir)
    dataset = Dataset.open(cfg.data.path)
    _check_labels(dataset, env)
    check_timestamp_ranges(dataset)
    cfg = _resolve_data_settings(cfg, dataset)
    lock = RunLock(run)
    try:
        start = _claim_run(run, cfg, env, lock, resume=resume, overwrite=overwrite)
        dataset = _training_dataset(dataset, cfg, env)
        source = resolve_source(cfg.train.init_from) if cfg.train.init_from and start is Start.FRESH else None
        if source is not None:  # the other mapping mode, other managed settings: refused here
            check_id_mapping(source, cfg, env.world_size)
        vocabs = _run_vocabularies(dataset, cfg, env, run, start, source)
        if start is Start.RESUME:  # refuse another dataset's vocabularies before anything is built on them
            last = ckpt.checkpoint_path(run_dir, "last")
            _check_id_mapping(last, cfg, vocabs)
        session = open_session(cfg, run_dir, env, vocabs=vocabs, plan=_run_plan(run, env, plan_file, start),
                               dataset=dataset)
        state = _resume(session) if start is Start.RESUME else TrainState()
        if source is not None:  # before any file of the run is written: a source that does not fit is refused
            state.init_from = warm_start_session(session, source)
        state.world_size, state.vocab_fingerprint = env.world_size, _id_fingerprint(cfg, session.vocabs)
        if env.is_main:  # the run is now committed: write (resume: rewrite) its files
            if start is Start.FRESH:
                run.start_fresh()  # the marker, before any other file of the run
            attach_log_file(buffered, run.log)
            if start is Start.RESUME:
                logger.info("resuming %s from its checkpoint %s (epoch %d, step %d)", run_dir,
                            ckpt.read_index(run_dir)["last"], state.epochs_done + 1, state.step)
                run.truncate_metrics_log(state.epochs_done)
            dump_config(cfg, run.config)
            save_plan(session.plan, env.world_size, run.plan)
            if session.vocabs is not None:
                session.vocabs.save(run.vocab)
                session.vocabs.oov_rates(session.dataset)  # logs them per split and feature
        logger.info(
            "model %s: %s parameters (%s in tables), world size %d (%s, %d threads per process), data %s",
            cfg.model.name, f"{session.params['total']:,}", f"{session.params['tables']:,}", env.world_size,
            env.backend, torch.get_num_threads(), cfg.data.path,
        )
        with stoppable():
            return _fit(session, state)
    finally:
        lock.release()


def _fit(session: Session, state: TrainState) -> Dict[str, Any]:
    """Epochs from ``state`` on: train, evaluate, checkpoint, stop early; then the final metrics."""
    env, run = session.env, RunDir(session.run_dir)
    # A resumed run continues the curves after its checkpoint's step (the earlier attempt's later events are hidden).
    board = TensorBoardLog(run.tensorboard if env.is_main else None, purge_step=state.step + 1 if state.step else None)
    try:
        return _epochs(session, state, board)
    finally:
        board.close()


def _epochs(session: Session, state: TrainState, board: TensorBoardLog) -> Dict[str, Any]:
    cfg, env, run = session.cfg, session.env, RunDir(session.run_dir)
    # The configured learning rates (a resumed optimizer keeps the config's param_groups); state.lr_scale scales them.
    base_lrs = [group["lr"] for group in session.optimizer.param_groups]
    for epoch in range(state.epochs_done, cfg.train.epochs):
        for group, lr in zip(session.optimizer.param_groups, base_lrs):
            group["lr"] = lr * state.lr_scale  # fused table optimizers read it at their next step()
        epoch_loss = _train_epoch(session, epoch, state, board)
        rate = state.epoch_samples / max(state.epoch_seconds, 1e-9)  # training only, evaluation excluded
        val = evaluate(session, "val")
        board.scalars(state.step, {"epoch/train_loss": epoch_loss, "epoch/samples_per_sec": rate})
        board.evaluation(state.step, "val", val)
        score = monitor_score(val, cfg.train.monitor)
        improved = score > state.best_score
        state.finish_epoch()
        if improved:
            state.best_score, state.best_epoch, state.bad_epochs = score, epoch + 1, 0
        else:
            state.bad_epochs += 1
            if cfg.train.lr_decay_on_plateau is not None:
                state.lr_scale *= cfg.train.lr_decay_on_plateau
        record = {"epoch": epoch + 1, "step": state.step, "train_loss": epoch_loss, "samples_per_sec": rate,
                  "lr_scale": state.lr_scale, "val": _headline(val), "monitor": score}
        if env.is_main:
            with open(run.metrics_log, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        logger.info(
            "epoch %d: train loss %.5f, val auc %s gauc %s logloss %s ne %s%s", epoch + 1, epoch_loss,
            *(format_metric(val, k, 5) for k in ("auc", "gauc", "logloss", "ne")), " (best)" if improved else "",
        )
        ckpt.save_checkpoint(session.run_dir, f"epoch_{epoch + 1}", _app_state(session), state.to_json(), is_best=improved)
        if state.bad_epochs >= cfg.train.patience:
            logger.info("early stopping: no better validation score (%s) for %d epochs",
                        describe_monitor(cfg.train.monitor), cfg.train.patience)
            break

    final = _final_metrics(session, state, board)
    if env.is_main:
        run.metrics.write_text(json.dumps(final, indent=2))
        _plots(run, final)
    return final


def monitor_score(val: Dict[str, Any], monitor: Dict[str, float]) -> float:
    """The validation score ``train.monitor`` ranks epochs by (higher is better): sum of weight x metric."""
    missing = [name for name in monitor if val.get(name) is None]
    if missing:
        raise TrainingError(f"train.monitor: validation has no {missing[0]} "
                            f"({val.get('not_computable', {}).get(missing[0], 'not computed')})")
    return float(sum(weight * val[name] for name, weight in monitor.items()))


def describe_monitor(monitor: Dict[str, float]) -> str:
    """``{auc: 1, logloss: -1}`` -> ``"auc - logloss"``."""
    terms = []
    for name, weight in monitor.items():
        sign = "-" if weight < 0 else "+"
        size = "" if abs(weight) == 1 else f"{abs(weight):g} x "
        terms.append(f"{sign} {size}{name}")
    return " ".join(terms).lstrip("+ ")


def _claim_run(run: RunDir, cfg: Config, env: DistEnv, lock: RunLock, *, resume: bool, overwrite: bool) -> Start:
    """Rank 0 takes the run's lock and decides how to start (nothing else is written); every rank learns
    the decision, or the refusal, which every rank then raises."""
    decision: List[Any] = [None]
    if env.is_main:
        try:
            decision[0] = _lock_and_decide(run, cfg, lock, resume, overwrite).value
        except UserError as e:
            decision[0] = {"error": str(e)}
    dist.broadcast_object_list(decision, src=0)
    if isinstance(decision[0], dict):
        raise RunDirError(decision[0]["error"])
    return Start(decision[0])


def _lock_and_decide(run: RunDir, cfg: Config, lock: RunLock, resume: bool, overwrite: bool) -> Start:
    if run.path.exists() and not run.path.is_dir():
        raise RunDirError(f"--out {run.path} is a file, not a folder")
    if resume and not run.path.exists():
        raise RunDirError(f"--resume: {run.path} does not exist")
    created = not run.path.exists()
    run.path.mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire()
        start = decide_start(run, to_dict(cfg), resume=resume, overwrite=overwrite)
    except UserError:
        lock.release()
        if created:
            run.path.rmdir()
        raise
    if start is Start.RESUME and not resume:
        logger.info("%s holds a checkpoint of this run: resuming it%s", run.path,
                    " (pass --overwrite to start afresh)" if run.is_marked() else " (a run of an earlier version)")
    return start


def _resolve_data_settings(cfg: Config, dataset: Dataset) -> Config:
    """``cfg`` with what the data decides filled in, so that the run's ``config.yaml`` records it and eval and
    export never re-read it from a ``meta.json`` edited since: the time zone of ``hour`` / ``dayofweek``."""
    zone = dataset.timezone(cfg.features.timezone)
    if cfg.features.timezone is None:
        meta = dataset.root / META_FILE
        source = str(meta) if dataset.meta.get("timezone") else f"the default ({meta} names none)"
        logger.info("time zone %s from %s, recorded in the run's config", zone, source)
    return dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, timezone=zone))


def _check_labels(dataset: Dataset, env: DistEnv) -> None:
    """Refuses a validation split on which AUC is undefined (no rows, or one class only): early stopping reads
    it. Such a test split is only reported: its AUC is recorded as not computable (``null`` and the reason)."""
    for split in ("val", "test"):
        rows = positives = 0
        for path in dataset.split_files(split):
            for batch in open_parquet(path).iter_batches(1 << 20, columns=[LABEL]):
                rows += batch.num_rows
                positives += int(pc.sum(batch.column(LABEL)).as_py() or 0)
        if rows and 0 < positives < rows:
            continue
        counts = f"dataset {dataset.root}: the {split} split has {rows} rows, {positives} of them with label 1"
        if split == "val":
            raise TrainingError(f"{counts}; validation AUC (early stopping, best checkpoint) needs both labels")
        if env.is_main:
            logger.warning("%s: its AUC, GAUC and NE will be recorded as not computable", counts)


def _allow_tf32(env: DistEnv) -> None:
    """TF32 matmuls and convolutions on CUDA (float32 inputs, 10-bit mantissa products, float32 sums): what
    ``train.precision: fp32`` means on a GPU; CPU arithmetic is unaffected."""
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _set_threads(cfg: Config, env: DistEnv) -> None:
    """Intra-op threads per process: ``train.threads``, else this node's cores shared by its processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(cfg.train.threads or max(1, cores // env.local_world_size))


def _run_plan(run: RunDir, env: DistEnv, plan_file: Optional[Path], start: Start) -> Optional[Path]:
    """The plan file to shard with: the given file, else (when resuming with the same world size) the run's
    own ``plan.json``, else ``None`` (the planner decides). A resumed run keeps its sharding so that
    its optimizer state (fused for sharded tables, dense for data-parallel ones) loads as saved."""
    if plan_file is not None:
        return plan_file
    if start is Start.RESUME and run.plan.exists() and plan_world_size(run.plan) == env.world_size:
        return run.plan
    return None


def make_pipeline(session: Session) -> TrainPipeline:
    """The step: ``TrainPipelineSparseDist`` (input distribution overlapped with compute) or, with
    ``train.pipeline: false``, ``TrainPipelineBase`` — the same ``progress()`` either way."""
    if session.optimizer is None:
        raise ValueError("an evaluation session (open_session(training=False)) has no optimizer to step with")
    kind = TrainPipelineSparseDist if session.cfg.train.pipeline else TrainPipelineBase
    return kind(session.model, session.optimizer, session.env.device)


def train_steps(session: Session, batches: Iterator[Batch]) -> Iterator[CTRTrainOutput]:
    """One training step (forward, loss, backward, fused table and dense updates) per batch of ``batches``,
    through :func:`make_pipeline`'s pipeline; yields each step's detached outputs.

    The pipeline reads batches ahead of the step it runs, so the steps are exactly those of ``batches``:
    to run N steps, pass N batches. The outputs stay on the device (no host sync here).
    """
    session.model.train()
    pipeline = make_pipeline(session)
    try:
        while True:
            try:
                out = pipeline.progress(batches)
            except StopIteration:
                return
            yield out
    finally:
        if isinstance(pipeline, TrainPipelineSparseDist):
            pipeline.detach()


class RunningSums:
    """Per-step loss and sample counts kept on the device between reads (no host sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.samples = 0

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss += loss.detach()
        self.samples += samples

    def read(self, flag: bool) -> Tuple[float, int, bool]:
        """Sums over all ranks since the last read, and whether any rank raised ``flag``; resets.

        The one host sync and the one collective of the step that calls it."""
        counts = torch.tensor([float(self.samples), float(flag)], dtype=torch.float64).to(self.device)
        sums = torch.cat([self.loss.view(1), counts])  # [loss, samples, flag]
        dist.all_reduce(sums)
        loss, samples, flags = sums.tolist()
        self.loss.zero_()
        self.samples = 0
        return loss, int(samples), flags > 0


def fault_injection_point(step: int, rank: int) -> None:
    """Rehearses a crash: with ``MDAF_FAULT_KILL_AT_STEP=S`` (and ``MDAF_FAULT_KILL_RANK``, default 0) the
    process kills itself with SIGKILL right after the in-epoch checkpoint of step ``S``, in the launcher's
    first attempt only (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so that a restart can be tested."""
    at = os.environ.get("MDAF_FAULT_KILL_AT_STEP")
    if at is None or int(at) != step or int(os.environ.get("MDAF_FAULT_KILL_RANK", "0")) != rank:
        return
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        logger.warning("MDAF_FAULT_KILL_AT_STEP=%s: killing this process (rank %d) after step %d", at, rank, step)
        os.kill(os.getpid(), signal.SIGKILL)


def _train_epoch(session: Session, epoch: int, state: TrainState, board: TensorBoardLog) -> float:
    """Trains epoch ``epoch`` from batch ``state.epoch_batches`` on; returns its mean training loss.

    The loss stays on the device: it is read (one host sync, and one all-reduce over the ranks) every
    ``train.log_every`` steps, at in-epoch checkpoints and at the end of the epoch; a non-finite value
    stops training naming the steps since the previous read.
    """
    cfg, env = session.cfg, session.env
    loader = session.loader("train", epoch=epoch, train=True, start_batch=state.epoch_batches)
    total = len(loader) if cfg.train.max_steps_per_epoch is None else min(len(loader), cfg.train.max_steps_per_epoch)
    batches: Iterator[Batch] = itertools.islice(iter(loader), max(total - state.epoch_batches, 0))
    bar = tqdm(total=total, initial=state.epoch_batches, desc=f"epoch {epoch + 1}", disable=env.rank != 0, unit="step")
    window = RunningSums(env.device)
    started = last_checkpoint = time.perf_counter()
    first_unread = state.epoch_batches + 1
    for out in train_steps(session, batches):
        window.add(out.loss, out.labels.shape[0])
        state.step += 1
        state.epoch_batches += 1
        bar.update(1)
        step_checkpoint = bool(cfg.train.checkpoint_every_steps) and state.step % cfg.train.checkpoint_every_steps == 0
        if not (state.epoch_batches % cfg.train.log_every == 0 or state.epoch_batches == total or step_checkpoint):
            continue
        minutes = cfg.train.checkpoint_every_minutes
        due = minutes is not None and time.perf_counter() - last_checkpoint >= 60 * minutes
        loss_sum, samples, any_due = window.read(due)  # the step's only host sync
        if not math.isfinite(loss_sum):
            raise TrainingError(
                f"non-finite loss (sum {loss_sum}) in steps {state.step - state.epoch_batches + first_unread}-{state.step} "
                f"(epoch {epoch + 1}, batches {first_unread}-{state.epoch_batches}); training stopped, the last good "
                f"checkpoint is kept in {RunDir(session.run_dir).checkpoints}"
            )
        window_steps = state.epoch_batches + 1 - first_unread
        first_unread = state.epoch_batches + 1
        state.epoch_loss_sum += loss_sum
        state.epoch_samples += samples
        now = time.perf_counter()
        board.scalars(state.step, {"train/loss": loss_sum / (window_steps * env.world_size),
                                   "train/samples_per_sec": samples / max(now - started, 1e-9)})
        state.epoch_seconds += now - started
        started = now
        rate = state.epoch_samples / max(state.epoch_seconds, 1e-9)
        mean = state.epoch_loss_sum / (state.epoch_batches * env.world_size)
        bar.set_postfix(loss=f"{mean:.4f}", samples_per_s=f"{rate:,.0f}")
        logger.debug("epoch %d step %d loss %.5f %.0f samples/s", epoch + 1, state.step, mean, rate)
        if (step_checkpoint or any_due) and state.epoch_batches < total:
            ckpt.save_checkpoint(session.run_dir, f"step_{state.step}", _app_state(session), state.to_json(),
                                 is_best=False, keep_steps=cfg.train.keep_step_checkpoints)
            last_checkpoint = started = time.perf_counter()  # checkpoint time is not training time
            fault_injection_point(state.step, env.rank)
    bar.close()
    return state.epoch_loss_sum / max(state.epoch_batches * env.world_size, 1)


def _app_state(session: Session) -> Dict[str, Any]:
    return {"model": session.model.state_dict(), "optim": session.optimizer.state_dict()}


def _resume(session: Session) -> TrainState:
    """Loads the run's ``last`` checkpoint (weights, optimizer state, RNG) and returns its state."""
    path = ckpt.checkpoint_path(session.run_dir, "last")
    _init_optimizer_state(session)
    app_state = _app_state(session)
    # The optimizer entry loads partially: parameters that never received a gradient (e.g. DCNv3's own
    # logit layers inside MDAF without Tri-BCE) have no Adam state in the checkpoint, and keep the
    # placeholder state init_state gave them, which no step ever reads. Under another world size the
    # optimizer state of tables whose sharding type changed (fused <-> data_parallel) restarts too.
    # A managed-id remapping does not reshard through DCP: on another world size the model loads as a warm start
    # does (the remapping and its tables moved to the new shards, warm_start.load_model_state) and the optimizer
    # state of the managed tables restarts (its rows moved).
    reshard = session.spec.managed and ckpt.read_state(path).get("world_size", 1) != session.env.world_size
    fresh = _managed_optimizer_state(session, app_state["optim"]) if reshard else []
    try:
        loaded = ckpt.load_checkpoint(path, {"optim": app_state["optim"]} if reshard else app_state, partial=("optim",))
        state = TrainState.from_json(loaded)
    except (TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path / ckpt.STATE_FILE}: not a training state ({e})") from None
    if reshard:
        load_model_state(InitSource(str(path), RunDir(session.run_dir), path), session.model,
                         table_key_rule(session.spec))
        for restarted, value in fresh:
            restarted.copy_(value)
        logger.warning("managed ids: the remapping of a %s-process checkpoint was resharded for %d processes (ids "
                       "without room in their new shard lose their row); the managed tables' optimizer state restarts",
                       state.world_size, session.env.world_size)
    if state.world_size != session.env.world_size:
        logger.warning(
            "resumed a %s-process checkpoint with %d processes: weights are resharded exactly; optimizer state of "
            "tables whose sharding type changed (fused <-> data_parallel) restarts",
            state.world_size, session.env.world_size,
        )
        if state.epoch_batches and session.cfg.data.sharding == "own_share":
            logger.warning(
                "data.sharding own_share: the ranks' shares depend on the world size, so the rest of epoch %d (from "
                "step %d of %d-process shares) follows the %d-process shares: some rows of this epoch are trained "
                "on twice and others not at all (later epochs are whole; every_rank_reads_all resumes exactly)",
                state.epochs_done + 1, state.epoch_batches, state.world_size, session.env.world_size,
            )
    if not reshard:
        session.model.load_state_dict(app_state["model"])
    session.optimizer.load_state_dict(_with_param_groups(app_state["optim"], session.optimizer.state_dict()))
    return state


def _managed_optimizer_state(session: Session, optim: Dict[str, Any]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """This rank's optimizer state tensors of the managed tables in ``optim`` (an optimizer ``state_dict()``),
    each with a copy of its current (fresh) value."""
    markers = [f".{s.table_name}.weight" for s in session.spec.managed_spaces]
    out: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for key, entries in optim.get("state", {}).items():
        if any(m in key for m in markers):
            for value in entries.values():
                local = [s.tensor for s in value.local_shards()] if isinstance(value, ShardedTensor) else [value]
                out += [(tensor, tensor.clone()) for tensor in local]
    return out


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
    keys = ("auc", "logloss", "ne", "gauc", "calibration", "ctr", "pred_ctr", "count", "auc_error_bound",
            "not_computable")
    return {k: metrics[k] for k in keys if k in metrics}


def _final_metrics(session: Session, state: TrainState, board: TensorBoardLog) -> Dict[str, Any]:
    """Scores validation and test with the best checkpoint."""
    path = ckpt.checkpoint_path(session.run_dir, "best")
    ckpt.load_model_weights(path, session.model)
    val = evaluate(session, "val")
    test = evaluate(session, "test", profile=True)
    board.evaluation(state.step, "test", test)
    final: Dict[str, Any] = {
        "model": session.cfg.model.name,
        "best_epoch": state.best_epoch,
        "epochs_run": state.epochs_done,
        "steps": state.step,
        "val": _headline(val),
        "test": _headline(test),
        "samples_per_sec": state.train_samples / max(state.train_seconds, 1e-9),
        "params": session.params,
        "world_size": session.env.world_size,
    }
    for key in ("gate", "gate_profile", "reliability"):
        if key in test:
            final[key] = test[key]
    if state.init_from is not None:
        final["init_from"] = state.init_from
    splits = session.dataset.meta.get("splits", {})
    ceiling = {s: {k: v for k, v in splits[s].items() if k.startswith("bayes")} for s in ("val", "test") if s in splits}
    if any(ceiling.values()):
        final["bayes_ceiling"] = ceiling
    return final


def _plots(run: RunDir, final: Dict[str, Any]) -> None:
    from mdaf_rec.plots import plot_gate_histogram, plot_gate_profile, plot_training_curves

    plot_training_curves(run.metrics_log, run.curves)
    if "gate" in final:
        plot_gate_histogram(final["gate"], run.gate_histogram, title=f"{final['model']}: fusion gate (test)")
    if "gate_profile" in final:
        plot_gate_profile(final["gate_profile"], run.gate_profile,
                          title=f"{final['model']}: fusion gate by history length and user activity (test)")


# --------------------------------------------------------------------------------------------------
# Re-scoring a saved run
# --------------------------------------------------------------------------------------------------


def eval_run(run_dir: Path, data: Optional[str], split: str, which: str = "best", verbose: bool = False) -> Dict[str, Any]:
    """Re-scores ``split`` of ``data`` (default: the run's data) with a saved checkpoint.

    Ids are mapped through the run's own vocabularies (unknown ids → OOV), so another dataset in the
    canonical schema can be scored with a trained run.
    """
    run = RunDir(run_dir).require()
    env = init_distributed()
    setup_logging(env.rank, verbose)
    cfg = load_config(run.config)
    if data is not None:
        cfg.data.path = data
    cfg.features.timezone = recorded_timezone(cfg.features.timezone, cfg.data.path)
    _set_threads(cfg, env)
    vocabs = Vocabularies.load(run.vocab) if cfg.features.id_mapping == "vocab" else None
    session = open_session(cfg, run_dir, env, vocabs=vocabs, training=False)
    path = ckpt.checkpoint_path(run_dir, which)
    if vocabs is None:
        state = ckpt.read_state(path)
        check_managed_settings(state.get("vocab_fingerprint"), cfg.features, f"checkpoint {path}")
        check_remapping_world_size(state.get("world_size"), env.world_size, f"checkpoint {path}")
    else:
        ckpt.check_vocabularies(path, vocabs)
    ckpt.load_model_weights(path, session.model)
    result = evaluate(session, split, profile=True)
    result["checkpoint"] = str(path)
    result["split"] = split
    return result
