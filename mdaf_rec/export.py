"""``mdaf-rec export``: a trained run → a self-contained serving folder (see ``docs/serving.md``).

One story: read the run's config and vocabularies, build the model on CPU with its tables on the ``meta``
device (no DMP, no process group, no table memory), load the checkpoint's dense weights into it (DCP reads
them from whatever layout training saved), wrap it in :class:`~mdaf_rec.serving.ServingModule` (plain-tensor
inputs: indices and the rows looked up for them), ``torch.export`` it with a dynamic batch dimension, write each
table straight from the checkpoint's files into a raw file, block of rows by block of rows, in fp32, fp16 or
row-wise int8 (:mod:`mdaf_rec.tables`: the export never holds a table, so its memory is the dense part plus one
block), and write::

    MODEL_DIR/
      model.pt2           torch.export program (torch.export.load → .module()): portable, any CPU or GPU
      tables/<table>.bin  one raw row-major file per table (fp32 | fp16 | int8 row-wise), memory-mapped by servers
      model.cpu.pt2       the same model compiled by AOTInductor for this CPU and torch version, with the
                          compiled CPU operators of mdaf_rec.ops (unless --no-compile; loads with
                          torch._inductor.aoti_load_package after torch.ops.load_library(ops library))
      ops/mdaf_rec_ops.so the compiled CPU operators' library (when the model calls them: the Mamba branch)
      vocab/              the run's vocabularies (vocab.json + one <space>.npy of known raw ids each); none under
                          features.id_mapping: managed, where the inputs are raw ids and each managed table has
      id_maps/<table>.{ids,rows}.bin  its remapping frozen at the checkpoint (sorted hashed ids, their rows), written
                          from the checkpoint's MCH buffers like the tables (:func:`mdaf_rec.tables.write_id_map`)
      config.yaml         the run's resolved config, for reference
      feature_spec.json   inputs, outputs, id → index mapping, time fields
      manifest.json       sha256 and size of every file above; its own sha256 is printed

The files are written beside MODEL_DIR first and moved in at the end (:class:`mdaf_rec.artifact.ArtifactWriter`):
an earlier export's files are replaced, nothing else in MODEL_DIR is touched. MODEL_DIR is never a run
directory or a dataset folder, nor inside one (:func:`check_out`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_modules import MCHManagedCollisionModule

from mdaf_rec import checkpoint as ckpt
from mdaf_rec.artifact import (
    CPU_PROGRAM_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    OPS_LIBRARY_FILE,
    PROGRAM_FILE,
    SPEC_FILE,
    ArtifactError,
    ArtifactWriter,
)
from mdaf_rec.config import Config, load_config
from mdaf_rec.data.dataset import DatasetError, is_dataset_folder, recorded_timezone
from mdaf_rec.data.vocab import VOCAB_DIR, Vocabularies
from mdaf_rec.features import NUM_RESERVED_INDICES, OOV_INDEX, TIME_FIELDS, FeatureSpec
from mdaf_rec.managed_ids import check_managed_settings, managed_fingerprint
from mdaf_rec.output import ArchiveFile
from mdaf_rec.run_dir import RunDir
from mdaf_rec.tables import TABLE_DTYPES, CheckpointTables, IdMapFile, TableFile, write_id_map, write_table
from mdaf_rec.trainable import build_train_module
from mdaf_rec.ops import scan_cpu
from mdaf_rec.serving import ID_INPUTS, ServingModule, example_inputs, export_cpu_program, export_program

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "int8")  # --quantize, the earlier spelling of --table-dtype fp32 | int8
QUANTIZATION_NAMES = {"fp32": "none", "fp16": "fp16", "int8": "int8_rowwise"}  # feature_spec.json's "quantization"


def table_keys(module: nn.Module) -> Dict[str, str]:
    """Table name -> state-dict key of its weight (as ``module.state_dict()`` has it), for every TorchRec table of
    ``module``."""
    keys = {}
    for name, child in module.named_modules():
        if isinstance(child, EmbeddingBagCollection):
            keys.update({t: f"{name}.embedding_bags.{t}.weight" for t in child.embedding_bags})
        if isinstance(child, EmbeddingCollection):
            keys.update({t: f"{name}.embeddings.{t}.weight" for t in child.embeddings})
    return keys


def remapping_keys(module: nn.Module) -> Dict[str, tuple[str, int]]:
    """Managed table name -> (state-dict prefix of its MCH module's buffers, as ``module.state_dict()`` has them;
    its buckets), for every remapping of ``module`` (none under ``vocab``)."""
    return {str(child._name): (name, child.buckets()) for name, child in module.named_modules()
            if isinstance(child, MCHManagedCollisionModule)}


def load_serving_module(
    run_dir: Path, which: str = "best"
) -> tuple[ServingModule, Dict[str, str], Config, FeatureSpec, Optional[Vocabularies], Path,
           Dict[str, tuple[str, int]]]:
    """The run's dense network with the weights of checkpoint ``which``, as a :class:`ServingModule`; the tables
    and the remappings of managed ids stay in the checkpoint (tables built on the ``meta`` device: no memory).

    Args:
        run_dir: a run directory written by ``mdaf-rec train``.
        which: ``best`` or ``last``.
    Returns:
        ``(serving module in eval mode, table name -> the checkpoint's key of its weight, config, feature spec,
        vocabularies (``None`` under ``features.id_mapping: managed``), checkpoint folder, managed table name ->
        (the checkpoint's prefix of its MCH module's buffers, its buckets))``.
    """
    run = RunDir(run_dir).require()
    cfg = load_config(run.config)
    path = ckpt.checkpoint_path(run_dir, which)
    vocabs = None
    if cfg.features.id_mapping == "managed":
        check_managed_settings(ckpt.read_state(path).get("vocab_fingerprint"), cfg.features, f"checkpoint {path}")
    else:
        vocabs = Vocabularies.load(run.vocab)
        ckpt.check_vocabularies(path, vocabs)
    spec, wrapper = build_train_module(cfg, vocabs.sizes if vocabs is not None else {}, table_device="meta",
                                       dense_device="cpu", compute_device="cpu", with_sparse_optimizer=False)
    tables, remappings = table_keys(wrapper), remapping_keys(wrapper)
    module = ServingModule(wrapper.model, spec)  # drops the table lookups (and the remappings) from wrapper.model
    dense = wrapper.state_dict()
    ckpt.load_checkpoint(path, {"model": dense})  # an unsharded CTRTrain has the checkpoint's (DMP's) keys
    wrapper.load_state_dict(dense)
    logger.info("loaded the dense network of %s (%s) from %s", cfg.model.name, which, path)
    return (module, {name: f"model.{key}" for name, key in tables.items()}, cfg, spec, vocabs, path,
            {name: (f"model.{prefix}", buckets) for name, (prefix, buckets) in remappings.items()})


def export_run(run_dir: Path, out: Path, which: str = "best", table_dtype: str = "fp32", compile: bool = True) -> str:
    """Writes the serving folder ``out`` for ``run_dir`` (see the module docstring).

    Args:
        run_dir: the trained run.
        out: MODEL_DIR (created; an earlier export's files there are replaced, other files kept; a
            non-empty folder that is not an earlier export, or a run or dataset folder or one inside it, is
            refused before anything is done).
        which: checkpoint, ``best`` or ``last``.
        table_dtype: ``fp32``, ``fp16`` or ``int8`` (row-wise 8-bit) table files.
        compile: also write the AOTInductor form for this CPU (``model.cpu.pt2``; needs a C++ compiler,
            ~10-20 s); skipped with a warning when the compiled CPU operators are unavailable.
    Returns:
        The sha256 of ``out/manifest.json``, the artifact's hash.
    """
    if table_dtype not in TABLE_DTYPES:
        raise ValueError(f"--table-dtype must be one of {TABLE_DTYPES}, got {table_dtype!r}")
    check_out(out, run_dir)
    with ArtifactWriter(out) as artifact:
        module, keys, cfg, spec, vocabs, path, remappings = load_serving_module(run_dir, which)
        timezone = _timezone(cfg)
        with torch.no_grad():
            gate_dim = int(module(*example_inputs(module, 1))[1].shape[1])
        with ArchiveFile(artifact.folder / PROGRAM_FILE) as fh:  # first: the largest file of a tiny model
            torch.export.save(export_program(module), fh)
        cpu_program = _write_cpu_program(module, artifact.folder) if compile else None
        source = CheckpointTables(path)
        tables: Dict[str, TableFile] = {}
        for name, key in keys.items():
            tables[name] = write_table(source, key, artifact.folder, name, table_dtype)
            logger.info("table %s: %d x %d -> %s (%s)", name, tables[name].rows, tables[name].dim,
                        tables[name].file, table_dtype)
        world_size = int(ckpt.read_state(path).get("world_size", 1))
        id_maps: Dict[str, IdMapFile] = {}
        for name, (prefix, buckets) in remappings.items():
            id_maps[name] = write_id_map(source, prefix, artifact.folder, name, world_size, buckets)
            logger.info("id map of %s: %d ids with a row of %d (trained on %d processes) -> %s", name,
                        id_maps[name].entries, id_maps[name].table_rows, world_size, id_maps[name].ids)
        if vocabs is not None:
            vocabs.save(artifact.folder / VOCAB_DIR)
        shutil.copyfile(RunDir(run_dir).config, artifact.folder / "config.yaml")
        doc = feature_spec_doc(cfg, spec, vocabs, timezone, gate_dim, table_dtype, path)
        doc["inputs"] += [
            {"name": name, "dtype": "float32",
             "shape": [doc["inputs"][ID_INPUTS.index(lookup.index)]["shape"][0], len(lookup.tables),
                       *doc["inputs"][ID_INPUTS.index(lookup.index)]["shape"][2:], lookup.dim],
             "layout": f"[:, j] = rows of {lookup.index}[:, j] in table lookups.{name}.tables[j]"}
            for name, lookup in module.lookups.items()
        ]
        doc["tables"] = {name: table.doc() for name, table in tables.items()}
        doc["lookups"] = {name: lookup._asdict() for name, lookup in module.lookups.items()}
        if id_maps:
            doc["id_maps"] = {name: id_map.doc() for name, id_map in id_maps.items()}
        if cpu_program is not None:
            doc["cpu_program"] = cpu_program
        (artifact.folder / SPEC_FILE).write_text(json.dumps(doc, indent=2))
    logger.info("exported %s (%s, %s tables) to %s; sha256 of %s: %s",
                cfg.model.name, path.name, table_dtype, out, MANIFEST_FILE, artifact.sha256)
    return artifact.sha256


def check_out(out: Path, run_dir: Path) -> None:
    """Refuses an ``out`` that is, or lies inside, ``run_dir``, another run directory, or a dataset folder: an
    export never writes into a run (whose checkpoint folders hold manifests too) or into data."""
    target = out.resolve()
    if target.is_relative_to(run_dir.resolve()):
        raise ArtifactError(f"--out {out}: is or lies inside the --run directory {run_dir}; export the model elsewhere")
    for folder in (target, *target.parents):
        what = "run directory" if RunDir(folder).is_run() else "dataset folder" if is_dataset_folder(folder) else None
        if what is not None:
            raise ArtifactError(f"--out {out}: is or lies inside the {what} {folder}; export the model elsewhere")


def _write_cpu_program(module: ServingModule, folder: Path) -> Optional[Dict[str, Any]]:
    """Writes ``model.cpu.pt2`` (and the operators' library it calls) into ``folder``; returns its
    ``feature_spec.json`` entry, or ``None`` when the compiled CPU operators are unavailable here."""
    if not scan_cpu.available():
        logger.warning("no compiled CPU operators here: the export holds the portable program only")
        return None
    logger.info("compiling the CPU program with AOTInductor (%s)", CPU_PROGRAM_FILE)
    calls_ops = export_cpu_program(module, folder / CPU_PROGRAM_FILE)
    if calls_ops:
        (folder / OPS_LIBRARY_FILE).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(scan_cpu.library_path(), folder / OPS_LIBRARY_FILE)
    return {
        "file": CPU_PROGRAM_FILE,
        "ops_library": OPS_LIBRARY_FILE if calls_ops else None,
        "torch": torch.__version__,
        "cpu": scan_cpu.cpu_fingerprint(),
        "note": "compiled for this CPU's instruction set and this torch version; elsewhere use 'program'",
    }


def _timezone(cfg: Config) -> str:
    """The time zone training used: the one recorded in the run's config (a run written before it was recorded:
    the training data's ``meta.json``)."""
    try:
        return recorded_timezone(cfg.features.timezone, cfg.data.path)
    except DatasetError as e:
        raise DatasetError(
            f"{e}; the export needs the training data's time zone: pass it with features.timezone in the run's config"
        ) from None


def feature_spec_doc(
    cfg: Config, spec: FeatureSpec, vocabs: Optional[Vocabularies], timezone: str, gate_dim: int, table_dtype: str,
    checkpoint: Path
) -> Dict[str, Any]:
    """Everything a server needs to turn a raw row into the program's inputs (``feature_spec.json``); under
    managed ids (``vocabs`` ``None``) the id inputs are raw ids and ``managed_spaces`` replaces ``vocabularies``
    (the tables' ``id_maps`` are added by :func:`export_run`)."""
    batch = "B"
    num_spaces = len(spec.sequence_spaces)
    fingerprint = vocabs.fingerprint if vocabs is not None else managed_fingerprint(cfg.features)
    index = "vocabulary {!r}" if vocabs is not None else "raw id (managed {!r}: mapped to rows by its id map)"
    doc = {
        "format_version": FORMAT_VERSION,
        "model": cfg.model.name,
        "quantization": QUANTIZATION_NAMES[table_dtype],
        "program": PROGRAM_FILE,
        "source": {"checkpoint": str(checkpoint.resolve()), "vocab_fingerprint": fingerprint},
        "inputs": [
            {"name": "static_ids", "dtype": "int64", "shape": [batch, len(spec.static_fields)],
             "order": spec.static_keys},
            {"name": "dense", "dtype": "float32", "shape": [batch, len(spec.dense_features)],
             "order": list(spec.dense_features), "layout": "raw column values (the model applies dense_log1p itself)"},
            {"name": "target_ids", "dtype": "int64", "shape": [batch, num_spaces],
             "order": [s.name for s in spec.sequence_spaces]},
            {"name": "history_ids", "dtype": "int64", "shape": [batch, num_spaces, spec.max_history],
             "order": [s.history_key for s in spec.sequence_spaces],
             "layout": "most recent last, right-padded with padding_index; length = number of non-padding entries"},
            {"name": "list_ids", "dtype": "int64", "shape": [batch, len(spec.pooled_lists), spec.max_history],
             "order": spec.pooled_list_keys,
             "layout": "each list on its own: most recent last, right-padded with padding_index; index by the "
                       "vocabulary of its space (pooled_lists)"},
        ],
        "outputs": [
            {"name": "probability", "dtype": "float32", "shape": [batch]},
            {"name": "gate", "dtype": "float32", "shape": [batch, gate_dim],
             "meaning": "MDAF fusion gate (1 = static branch, 0 = sequential)" if cfg.model.name.startswith("mdaf")
             else "zeros: this model has no fusion gate"},
        ],
        "static_fields": [
            {"key": f.name, "column": f.column, "table_rows": f.num_embeddings,
             "index": f"derived from timestamp: {_time_field_rule(f.column)}" if f.column in TIME_FIELDS
             else index.format(f.name)}
            for f in spec.static_fields
        ],
        "sequence_spaces": [
            {"key": s.name, "target_column": cfg.features.id_spaces[s.name].column, "history_column": s.history_key,
             "table_rows": s.num_embeddings, "index": index.format(s.name)}
            for s in spec.sequence_spaces
        ],
        "dense_features": list(spec.dense_features),
        "dense_log1p": spec.dense_log1p,
        "static_dim": spec.static_dim,
        "sequence_dim": spec.sequence_dim,
        "max_history": spec.max_history,
        "pooled_history": spec.pooled_history,
        "pooled_lists": [{"column": column, "space": space, "index": index.format(space)}
                         for column, space in spec.pooled_lists],
        "history_truncation": f"only the most recent {spec.max_history} entries are kept (as in training)",
        "timezone": timezone,
        "time_fields": {c: _time_field_rule(c) for c in TIME_FIELDS},
        "padding_index": spec.padding_id,
    }
    if vocabs is None:
        doc["managed_spaces"] = [dataclasses.asdict(s) for s in spec.managed_spaces]
        return doc
    doc["oov_index"] = OOV_INDEX
    doc["vocabularies"] = {
        "dir": VOCAB_DIR,
        "fingerprint": vocabs.fingerprint,
        "spaces": {name: _mapping(name, v.ids is None, v.settings.hash_buckets) for name, v in vocabs.spaces.items()},
    }
    return doc


def _time_field_rule(column: str) -> str:
    rules = {
        "hour": "local hour 0..23 of `timestamp` (UTC epoch seconds) in `timezone`",
        "dayofweek": "local day of week of `timestamp` in `timezone`, Monday = 0 .. Sunday = 6",
    }
    return rules[column]


def _mapping(name: str, hashed: bool, buckets: Optional[int]) -> Dict[str, Any]:
    if hashed:
        return {"hash_buckets": buckets,
                "rule": f"index = splitmix64(raw) % {buckets} + {NUM_RESERVED_INDICES} (see mdaf_rec.data.vocab.stable_hash)"}
    return {"file": f"{VOCAB_DIR}/{name}.npy",
            "rule": f"known raw ids (int64) in index order (ascending, a warm-started run's grown ids after its "
                    f"source's); index = position in the file + {NUM_RESERVED_INDICES}; "
                    f"unknown raw id -> {OOV_INDEX}"}
