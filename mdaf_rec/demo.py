"""``mdaf-rec demo``: the embedded synthetic data, MDAF-Mamba trained on CPU, AUC next to the ceiling."""

from __future__ import annotations

import logging
from pathlib import Path

from mdaf_rec.config import Config
from mdaf_rec.data import schema
from mdaf_rec.data.synth import generate
from mdaf_rec.distributed import is_main_process
from mdaf_rec.logs import setup_logging
from mdaf_rec.run_dir import RunDir
from mdaf_rec.train import train

logger = logging.getLogger(__name__)


def ensure_synthetic_data(path: Path) -> None:
    """Generates the default synthetic dataset (``SynthParams`` defaults) at ``path`` if missing."""
    if all((path / f"{split}.parquet").exists() for split in schema.SPLITS):
        return
    setup_logging()
    logger.info("generating the synthetic default dataset in %s", path)
    generate(path)


def run_demo(cfg: Config, out: Path, verbose: bool = False) -> None:
    """Makes the data if missing, trains ``cfg`` afresh (an earlier demo run in ``out`` is replaced, other
    files are never touched; a folder that is not a run of this version is refused), prints validation/test
    AUC next to the Bayes-optimal AUC."""
    ensure_synthetic_data(Path(cfg.data.path))
    final = train(cfg, out, overwrite=True, verbose=verbose)
    if not is_main_process():
        return
    splits = final.get("bayes_ceiling", {})
    print(f"\n{cfg.model.name} on {cfg.data.path}  (run directory: {out})")
    print(f"{'split':<6} {'AUC':>8} {'Bayes AUC':>10} {'GAUC':>8} {'logloss':>8} {'Bayes logloss':>14}")
    for split in ("val", "test"):
        m, b = final[split], splits.get(split, {})
        print(
            f"{split:<6} {m['auc']:>8.4f} {b.get('bayes_auc', float('nan')):>10.4f} {m['gauc']:>8.4f} "
            f"{m['logloss']:>8.4f} {b.get('bayes_logloss', float('nan')):>14.4f}"
        )
    if "gate" in final:
        print(f"gate (1 = static, 0 = sequential): mean {final['gate']['mean']:.3f}, std {final['gate']['std']:.3f}")
    run = RunDir(out)
    plots = [run.curves, run.gate_histogram, run.gate_profile]
    print(f"plots: {', '.join(str(p) for p in plots if p.exists())}")
