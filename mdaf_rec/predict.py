"""``mdaf-rec predict``: batch scoring of canonical-schema rows with an exported MODEL_DIR.

Rows go through the training data path: :func:`~mdaf_rec.data.validate.validate` (an error names the
column), :class:`~mdaf_rec.data.loader.WindowColumns` (histories truncated to the most recent
``max_history`` ids), :class:`~mdaf_rec.data.loader.BatchConverter` (raw ids → indices through
MODEL_DIR's vocabularies, unknown → OOV 1; under managed ids the raw ids stay; hour / day of week in the export's
time zone), then :func:`~mdaf_rec.serving.serving_inputs`, the rows of those indices (managed: of the rows the
frozen id maps give the raw ids) looked up in MODEL_DIR's memory-mapped table files
(:class:`~mdaf_rec.tables.ServingTables`: fp32, fp16 or int8), and into the exported program, never the training
model. ``label`` is not needed. The output Parquet has ``row_index`` (row number in the
input, counting through the files in name order), the ``--key`` columns copied through,
``probability`` and, with ``--with-gate``, ``gate`` (float, or a list of floats for a vector gate).
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mdaf_rec.artifact import PROGRAM_FILE, SPEC_FILE, ArtifactError, read_feature_spec, read_manifest
from mdaf_rec.config import is_timezone
from mdaf_rec.data.dataset import DatasetError, open_parquet
from mdaf_rec.data.loader import BatchConverter, WindowColumns
from mdaf_rec.data.schema import LABEL
from mdaf_rec.data.validate import ColumnRules, DataError, validate
from mdaf_rec.data.vocab import VOCAB_DIR, Vocabularies
from mdaf_rec.features import FeatureSpec
from mdaf_rec.ops import scan_cpu
from mdaf_rec.serving import serving_inputs, spec_from_json
from mdaf_rec.tables import Lookup, ServingTables

logger = logging.getLogger(__name__)

ROW_INDEX = "row_index"


class ExportedModel:
    """A verified MODEL_DIR: the exported program plus what turns raw rows into its inputs (the vocabularies,
    then the memory-mapped tables).

    Args:
        model_dir: folder written by ``mdaf-rec export``; every file its manifest lists is verified
            before anything is loaded (:func:`~mdaf_rec.artifact.read_feature_spec`).
        manifest_sha256: if given, the sha256 that ``model_dir/manifest.json`` must have.
    """

    def __init__(self, model_dir: Path, manifest_sha256: Optional[str] = None) -> None:
        self.doc: Dict[str, Any] = read_feature_spec(model_dir, manifest_sha256)
        listed = read_manifest(model_dir)
        path = model_dir / SPEC_FILE
        try:
            self.spec: FeatureSpec = spec_from_json(self.doc)
            timezone = self.doc["timezone"]
            self.lookups = {name: Lookup(str(e["index"]), [str(t) for t in e["tables"]], int(e["dim"]),
                                         [int(c) for c in e.get("columns", [])])
                            for name, e in self.doc["lookups"].items()}
            self.tables = ServingTables(model_dir, self.doc["tables"], listed, self.doc.get("id_maps", {}))
        except KeyError as e:
            raise ArtifactError(f"{path}: missing key {e}") from None
        except (TypeError, ValueError, AttributeError, OSError) as e:
            raise ArtifactError(f"{path}: malformed ({type(e).__name__}: {e})") from None
        unknown = [t for lookup in self.lookups.values() for t in lookup.tables if t not in self.tables.tables]
        if unknown:
            raise ArtifactError(f"{path}: key 'lookups' names table {unknown[0]!r}, which key 'tables' does not list")
        if not is_timezone(timezone):
            raise ArtifactError(f"{path}: key 'timezone': unknown IANA time zone {timezone!r}")
        vocabs = None if self.spec.managed else Vocabularies.load(model_dir / VOCAB_DIR)  # managed: raw ids in
        self.converter = BatchConverter(self.spec, vocabs, timezone)
        self.rules = ColumnRules.from_spec(self.spec)
        self.program = load_program(model_dir, self.doc)

    def inputs(self, table: pa.Table, source: str, row_offset: int) -> Dict[str, torch.Tensor]:
        """Raw rows -> program inputs (validated, truncated, mapped through the vocabularies).

        Args:
            table: canonical-schema rows (``label`` optional; other columns ignored).
            source: file name for error messages.
            row_offset: row number of ``table``'s first row within ``source``.
        Returns:
            ``static_ids``, ``dense``, ``target_ids``, ``history_ids``, ``list_ids`` and the rows looked up for
            them (``static_rows``, ``pooled_rows``, ``target_rows``, ``history_rows``, ``list_rows``; see
            :mod:`mdaf_rec.serving`); the program takes those its ``feature_spec.json`` lists (an export written
            before ``list_ids`` existed takes neither list input).
        """
        columns = [c for c in self.rules.columns if c != LABEL or c in table.column_names]
        checked = validate(table, self.rules, source, row_offset, columns).select(columns)
        n = checked.num_rows
        rows = WindowColumns(checked, np.arange(n), self.rules.all_lists).select(np.arange(n), self.spec.max_history)
        rows.columns.setdefault(LABEL, np.zeros(n, dtype=np.int8))
        ids = serving_inputs(self.converter(rows), self.spec)
        return {**ids, **self.tables.rows(self.lookups, ids)}

    def score(self, table: pa.Table, source: str, row_offset: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores raw rows (arguments as for :meth:`inputs`).

        Returns:
            probability ``[n]`` float32 and gate ``[n, G]`` float32.
        """
        inputs = self.inputs(table, source, row_offset)
        with torch.no_grad():
            probability, gate = self.program(*(inputs[i["name"]] for i in self.doc["inputs"]))
        return probability.numpy(), gate.numpy()


def load_program(model_dir: Path, doc: Dict[str, Any]) -> Callable[..., Any]:
    """The fastest program of a verified MODEL_DIR that runs here: the AOTInductor CPU program when it was
    compiled for this CPU and torch version (after loading the operators' library it calls), else the
    portable ``torch.export`` program."""
    cpu = doc.get("cpu_program")
    if cpu is not None and cpu["torch"] == torch.__version__ and cpu["cpu"] == scan_cpu.cpu_fingerprint():
        # Loading the library twice would register the operators twice: mdaf_rec.ops may have loaded them.
        if cpu["ops_library"] is not None and not scan_cpu.ops_registered():
            torch.ops.load_library(str(model_dir / cpu["ops_library"]))
        logger.info("running %s (AOTInductor, compiled for this CPU)", cpu["file"])
        return torch._inductor.aoti_load_package(str(model_dir / cpu["file"]))
    if cpu is not None:
        logger.info("%s was compiled for another CPU or torch version: running the portable %s", cpu["file"], PROGRAM_FILE)
    return torch.export.load(str(model_dir / PROGRAM_FILE)).module()


def predict(
    model_dir: Path,
    data: Path,
    out: Path,
    keys: Sequence[str] = (),
    with_gate: bool = False,
    batch_size: int = 8192,
    manifest_sha256: Optional[str] = None,
) -> int:
    """Scores every row of ``data`` into the Parquet file ``out`` (see the module docstring).

    Args:
        model_dir: MODEL_DIR written by ``mdaf-rec export``.
        data: a Parquet file or a folder of them (canonical schema, raw ids).
        out: output Parquet file; refused if it is an input (``data``, a file in it, a file of
            ``model_dir``) or exists as anything but a regular file (a folder, a link, a device, a pipe).
            Written into a new file of an unpredictable name beside it (:func:`_new_partial`) and renamed
            when complete.
        keys: input columns copied to the output.
        with_gate: also write the fusion gate.
        batch_size: rows scored per program call.
        manifest_sha256: if given, ``model_dir/manifest.json`` must have this sha256 (checked first).
    Returns:
        The number of rows scored.
    """
    files = input_files(data)
    check_output_path(out, {"--data": data, "--model": model_dir})
    reserved = [k for k in keys if k in (ROW_INDEX, "probability", "gate")]
    if reserved:
        raise DataError(f"--key {reserved[0]!r}: the output already has a column of that name")
    model = ExportedModel(model_dir, manifest_sha256)
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = _new_partial(out)
    total = 0
    try:
        with os.fdopen(fd, "wb") as sink:
            writer: Optional[pq.ParquetWriter] = None
            for table in _scored_tables(model, files, keys, with_gate, batch_size):
                writer = writer or pq.ParquetWriter(sink, table.schema)
                writer.write_table(table)
                total += table.num_rows
            if writer is None:
                raise DataError(f"{data}: no rows to score")
            writer.close()
        check_output_path(out, {})  # again: what is there now is replaced
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    logger.info("scored %d rows in %.1f s -> %s", total, time.perf_counter() - started, out)
    return total


def check_output_path(out: Path, inputs: Dict[str, Path]) -> None:
    """Refuses an output file that exists as anything but a regular file (a folder, a symbolic link, a device,
    a pipe, a socket), or is (or lies inside) one of the ``inputs`` (flag -> path)."""
    if out.is_symlink():
        raise DataError(f"--out {out}: is a symbolic link; give the path of the output file itself (neither the "
                        "link nor its target is replaced)")
    if out.is_dir():
        raise DataError(f"--out {out}: is a folder; give the path of the output Parquet file")
    if out.exists() and not stat.S_ISREG(out.stat().st_mode):
        raise DataError(f"--out {out}: is not a regular file (a device, pipe or socket); refusing to replace it")
    target = out.resolve()
    for flag, source in inputs.items():
        if target == source.resolve() or (out.exists() and source.exists() and os.path.samefile(out, source)):
            raise DataError(f"--out {out}: is the {flag} input itself; refusing to overwrite it")
        if target.is_relative_to(source.resolve()):
            raise DataError(f"--out {out}: lies inside the {flag} folder {source}; write the scores elsewhere")


def _new_partial(out: Path) -> tuple[int, Path]:
    """A new file beside ``out`` for the scores until they are complete: an unpredictable name, created
    exclusively (``O_EXCL``: never an existing file, never through a planted link), mode 0666 less the umask.

    Returns:
        its open file descriptor (write only) and its path.
    """
    path = out.with_name(f".{out.name}.{secrets.token_hex(8)}.partial")
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666), path


def _scored_tables(
    model: ExportedModel, files: Sequence[Path], keys: Sequence[str], with_gate: bool, batch_size: int
) -> Iterator[pa.Table]:
    """Output tables, one per input record batch: ``row_index``, key columns, probability, gate."""
    row_base = 0
    for path in files:
        parquet = open_parquet(path)
        missing = [k for k in keys if k not in parquet.schema_arrow.names]
        if missing:
            raise DataError(f"{path}: key column(s) {missing} not found (has {parquet.schema_arrow.names})")
        offset = 0
        for record_batch in parquet.iter_batches(batch_size=batch_size):
            table = pa.Table.from_batches([record_batch])
            probability, gate = model.score(table, str(path), offset)
            columns: Dict[str, Any] = {ROW_INDEX: np.arange(row_base + offset, row_base + offset + table.num_rows)}
            columns.update({k: table.column(k) for k in keys})
            columns["probability"] = probability
            if with_gate:
                columns["gate"] = (
                    gate[:, 0] if gate.shape[1] == 1
                    else pa.FixedSizeListArray.from_arrays(pa.array(gate.reshape(-1)), gate.shape[1])
                )
            offset += table.num_rows
            yield pa.table(columns)
        row_base += offset


def input_files(data: Path) -> List[Path]:
    """``data`` itself if a file, else its ``*.parquet`` files in name order."""
    if data.is_file():
        return [data]
    files = sorted(data.glob("*.parquet")) if data.is_dir() else []
    if not files:
        raise DatasetError(f"{data}: no Parquet file (give a .parquet file or a folder of them)")
    return files
