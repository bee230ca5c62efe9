#!/usr/bin/env python
"""Train FuxiCTR peer models (DNN, DCNv3, BST) on a canonical-schema dataset folder.

Runs inside the separate venv made by ``tools/peers/setup.sh`` (fuxictr==2.3.10, CPU torch).
It never imports ``mdaf_rec`` or ``torchrec``; the model code comes from a local FuxiCTR
checkout (``--fuxictr-src``, a folder holding ``model_zoo/``) so nothing of FuxiCTR is
committed here. See tools/peers/README.md for the setup, the inputs and the hyper-parameters.

Example:
    .venv-peers/bin/python tools/peers/run_fuxictr.py --data data/ml \
        --fuxictr-src /work/fuxictr-src --models DNN DCNv3 BST \
        --seeds 2021 2022 2023 --out runs/peers/ml
"""
import os

# One thread per process (the machine is shared); must be set before numpy/torch load.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
             "NUMEXPR_NUM_THREADS", "POLARS_MAX_THREADS", "RAYON_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import copy
import hashlib
import importlib.util
import json
import logging
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import torch
import yaml

torch.set_num_threads(1)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:
    pass

import fuxictr
from fuxictr.features import FeatureMap
from fuxictr.preprocess import FeatureProcessor
from fuxictr.pytorch.dataloaders import RankDataLoader
from fuxictr.pytorch.torch_utils import seed_everything

LIBRARY = f"fuxictr {fuxictr.__version__}"
MAX_LEN = 50
CATEGORICAL = ["user_id", "item_id", "category_id", "hour", "dayofweek"]
SEQUENCES = {"item_history": "item_id", "category_history": "category_id"}  # sequence -> shared table
LABEL = "label"

# Where each model's code lives inside a FuxiCTR checkout (DCNv3 from 20c8af2^, see README).
MODEL_DIRS = {"DNN": "model_zoo/DNN/DNN_torch", "DCNv3": "model_zoo/DCNv3", "BST": "model_zoo/BST"}

# Training recipe shared by all models (FuxiCTR model_zoo "Base" + "<Model>_default" keys).
COMMON = {
    "task": "binary_classification",
    "loss": "binary_crossentropy",
    "metrics": ["logloss", "AUC"],
    "optimizer": "adam",
    "learning_rate": 1.0e-3,
    "embedding_regularizer": 0,
    "net_regularizer": 0,
    "batch_size": 2048,
    "embedding_dim": 16,
    "epochs": 20,
    "shuffle": True,
    "monitor": "AUC",
    "monitor_mode": "max",
    "early_stop_patience": 2,
    "reduce_lr_on_plateau": True,
    "save_best_only": True,
    "eval_steps": None,
    "max_gradient_norm": 10.0,
}

# Model hyper-parameters (see README for where each value comes from).
MODEL_PARAMS = {
    "DNN": {
        "hidden_units": [256, 128, 64],
        "hidden_activations": "relu",
        "net_dropout": 0,
        "batch_norm": False,
    },
    "DCNv3": {
        "num_deep_cross_layers": 3,
        "num_shallow_cross_layers": 3,
        "deep_net_dropout": 0.1,
        "shallow_net_dropout": 0.3,
        "layer_norm": True,
        "batch_norm": False,
        "num_heads": 1,
    },
    "BST": {
        "dnn_hidden_units": [256, 128, 64],
        "dnn_activations": "relu",
        "num_heads": 4,
        "stacked_transformer_layers": 1,
        "attention_dropout": 0,
        "net_dropout": 0,
        "layer_norm": True,
        "use_residual": True,
        "batch_norm": False,
        "bst_target_field": [["item_id", "category_id"]],
        "bst_sequence_field": [["item_history", "category_history"]],
        "seq_pooling_type": "mean",
        "use_position_emb": True,
        "use_causal_mask": False,
    },
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="canonical dataset folder (train/val/test.parquet, meta.json)")
    p.add_argument("--fuxictr-src", required=True, help="FuxiCTR checkout holding model_zoo/ (with DCNv3)")
    p.add_argument("--models", nargs="+", default=["DNN", "DCNv3", "BST"], choices=sorted(MODEL_DIRS))
    p.add_argument("--seeds", nargs="+", type=int, default=[2021, 2022, 2023])
    p.add_argument("--out", required=True, help="output folder: OUT/<model>/seed_<s>/metrics.json, OUT/summary.json")
    p.add_argument("--epochs", type=int, default=None, help=f"max epochs (default {COMMON['epochs']})")
    p.add_argument("--embedding-dim", type=int, default=None, help=f"default {COMMON['embedding_dim']}")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {COMMON['batch_size']}")
    p.add_argument("--set", action="append", default=[], metavar="[MODEL.]KEY=VALUE",
                   help="override a hyper-parameter (VALUE parsed as YAML); MODEL. limits it to one model")
    p.add_argument("--force", action="store_true", help="re-run (model, seed) pairs that already have metrics.json")
    p.add_argument("--rebuild-data", action="store_true", help="re-encode the dataset even if the cache matches")
    p.add_argument("--verbose", action="store_true", help="show FuxiCTR's per-batch progress bars")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data

def _source_stamp(data_dir):
    stamp = {"library": LIBRARY, "max_len": MAX_LEN, "format_version": 1}
    for name in ("train.parquet", "val.parquet", "test.parquet", "meta.json"):
        st = (data_dir / name).stat()
        stamp[name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return stamp


def _read_split(path, tz):
    """Canonical Parquet -> string-valued frame with derived hour/dayofweek and '^'-joined histories."""
    cols = ["user_id", "item_id", "category_id", "timestamp", LABEL, "item_history", "category_history"]
    df = pd.read_parquet(path, columns=cols)
    local = pd.to_datetime(df["timestamp"], unit="s", utc=True).dt.tz_convert(tz)
    out = pl.DataFrame({
        "user_id": df["user_id"].astype("int64").astype(str).to_numpy(),
        "item_id": df["item_id"].astype("int64").astype(str).to_numpy(),
        "category_id": df["category_id"].astype("int64").astype(str).to_numpy(),
        "hour": local.dt.hour.astype(str).to_numpy(),
        "dayofweek": local.dt.dayofweek.astype(str).to_numpy(),  # Monday 0 ... Sunday 6
        LABEL: df[LABEL].astype("int64").to_numpy(),
    })
    for seq in SEQUENCES:
        # keep the most recent MAX_LEN entries (most recent last), then join with FuxiCTR's splitter
        joined = [("^".join(str(int(v)) for v in list(h)[-MAX_LEN:]) if h is not None else "")
                  for h in df[seq].tolist()]
        out = out.with_columns(pl.Series(seq, joined, dtype=pl.String))
    return out


def feature_cols():
    cols = [{"name": c, "active": True, "dtype": "str", "type": "categorical"} for c in CATEGORICAL]
    for seq, shared in SEQUENCES.items():
        # feature_encoder left at FuxiCTR's default (layers.MaskedAveragePooling()); BST drops it below.
        cols.append({"name": seq, "active": True, "dtype": "str", "type": "sequence", "splitter": "^",
                     "max_len": MAX_LEN, "share_embedding": shared, "padding": "post"})
    return cols


def prepare_data(data_dir, out_dir, rebuild=False):
    """Fit FuxiCTR's FeatureProcessor on train (min count 1) and write train/valid/test.npz."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    tz = meta.get("timezone") or "UTC"
    cache = Path(out_dir) / "_fuxictr_data"
    dataset_id = "data"
    ddir = cache / dataset_id
    stamp = _source_stamp(data_dir)
    stamp_file = cache / "source_stamp.json"
    npz = {s: ddir / f"{s}.npz" for s in ("train", "valid", "test")}
    if (not rebuild and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp
            and all(p.exists() for p in npz.values()) and (ddir / "feature_processor.pkl").exists()):
        logging.info("Using cached encoded data: %s", ddir)
        return ddir, {k: str(v) for k, v in npz.items()}, tz
    if cache.exists():
        shutil.rmtree(cache)
    ddir.mkdir(parents=True)
    t0 = time.time()
    fp = FeatureProcessor(feature_cols=feature_cols(), label_col={"name": LABEL, "dtype": "float"},
                          dataset_id=dataset_id, data_root=str(cache))
    frames = {"train": _read_split(data_dir / "train.parquet", tz),
              "valid": _read_split(data_dir / "val.parquet", tz),
              "test": _read_split(data_dir / "test.parquet", tz)}
    train_lf = fp.preprocess(frames["train"].lazy())
    fp.fit(train_lf, min_categr_count=1, rebuild_dataset=True)
    fmap = fp.feature_map
    for split, frame in frames.items():
        batch = {c: frame[c].to_numpy() for c in frame.columns}
        batch = fp.transform(batch)
        arrays = {}
        for name, spec in fmap.features.items():
            arr = np.asarray(batch[name], dtype=np.int64)
            if spec["type"] == "sequence":
                assert arr.shape == (len(frame), spec["max_len"]), (name, arr.shape)
            arrays[name] = arr
        arrays[LABEL] = np.asarray(batch[LABEL], dtype=np.int64)
        np.savez(npz[split], **arrays)
        logging.info("%s: %d rows -> %s", split, len(frame), npz[split])
    stamp_file.write_text(json.dumps(stamp, indent=1))
    logging.info("Encoded data in %.1fs (timezone %s)", time.time() - t0, tz)
    return ddir, {k: str(v) for k, v in npz.items()}, tz


# ----------------------------------------------------------------------------- models

def load_model_class(fuxictr_src, model):
    src = Path(fuxictr_src) / MODEL_DIRS[model] / "src"
    init = src / "__init__.py"
    if not init.exists():
        raise SystemExit(f"{init} not found: --fuxictr-src must be a FuxiCTR checkout with "
                         f"{MODEL_DIRS[model]}/ (DCNv3 comes from commit 20c8af2^, see tools/peers/README.md)")
    name = f"_fuxictr_zoo_{model}"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(src)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return getattr(module, model)


def _parse_sets(items, models):
    per_model = {m: {} for m in models}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected [MODEL.]KEY=VALUE")
        key, value = item.split("=", 1)
        value = yaml.safe_load(value)
        target = models
        if "." in key:
            m, key = key.split(".", 1)
            if m not in MODEL_DIRS:
                raise SystemExit(f"--set {item!r}: unknown model {m!r}")
            target = [m] if m in models else []
        for m in target:
            known = set(COMMON) | set(MODEL_PARAMS[m])
            if key not in known:
                logging.warning("--set %s: %r is not a known %s parameter; passing it on anyway", item, key, m)
            per_model[m][key] = value
    return per_model


def model_params(model, args, overrides):
    params = copy.deepcopy(COMMON)
    params.update(copy.deepcopy(MODEL_PARAMS[model]))
    if args.epochs is not None:
        params["epochs"] = args.epochs
    if args.embedding_dim is not None:
        params["embedding_dim"] = args.embedding_dim
    if args.batch_size is not None:
        params["batch_size"] = args.batch_size
    params.update(overrides.get(model, {}))
    return params


def model_feature_map(ddir, model, params):
    """FeatureMap as FuxiCTR's run_expid.py loads it (default embedding_dim from the params)."""
    load_params = {"embedding_dim": params["embedding_dim"]}
    if model == "BST":
        # FuxiCTR's `feature_encoder: null` for BST's sequence fields (raw (B, L, D) sequence embeddings
        # go to the transformer), applied through FuxiCTR's own `feature_specs` mechanism.
        load_params["feature_specs"] = [{"name": list(SEQUENCES), "feature_encoder": None}]
    fmap = FeatureMap(ddir.name, str(ddir))
    fmap.load(str(ddir / "feature_map.json"), load_params)
    return fmap


def run_one(model, seed, ddir, npz, args, overrides, run_dir):
    params = model_params(model, args, overrides)
    params["seed"] = seed
    fmap = model_feature_map(ddir, model, params)
    cls = load_model_class(args.fuxictr_src, model)
    seed_everything(seed=seed)
    kwargs = dict(params)
    if model == "BST":
        kwargs["bst_target_field"] = [tuple(x) if isinstance(x, list) else x for x in params["bst_target_field"]]
        kwargs["bst_sequence_field"] = [tuple(x) if isinstance(x, list) else x for x in params["bst_sequence_field"]]
    epochs = kwargs.pop("epochs")
    batch_size = kwargs.pop("batch_size")
    shuffle = kwargs.pop("shuffle")
    max_gradient_norm = kwargs.pop("max_gradient_norm")
    kwargs.pop("seed")
    model_obj = cls(fmap, model_id=model, gpu=-1, model_root=str(run_dir / "checkpoints"),
                    verbose=1 if args.verbose else 0, **kwargs)
    os.makedirs(model_obj.model_dir, exist_ok=True)
    n_params = sum(p.numel() for p in model_obj.parameters() if p.requires_grad)

    # Record every validation step (FuxiCTR's BaseModel does not keep a history).
    history = []
    orig = model_obj.checkpoint_and_earlystop

    def recording(logs, min_delta=1e-6):
        before = model_obj._best_metric
        orig(logs, min_delta=min_delta)
        history.append({"epoch": model_obj._epoch_index + 1,
                        "val_auc": float(logs["AUC"]),
                        "improved": bool(model_obj._best_metric != before),
                        "lr_after": float(model_obj.optimizer.param_groups[0]["lr"])})
    model_obj.checkpoint_and_earlystop = recording

    train_gen, valid_gen = RankDataLoader(fmap, stage="train", train_data=npz["train"], valid_data=npz["valid"],
                                          batch_size=batch_size, shuffle=shuffle, data_format="npz",
                                          num_workers=0)
    t0 = time.time()
    model_obj.fit(train_gen, epochs=epochs, validation_data=valid_gen, max_gradient_norm=max_gradient_norm)
    train_seconds = time.time() - t0
    val_logs = model_obj.evaluate(valid_gen, metrics=["logloss", "AUC"])
    test_gen = RankDataLoader(fmap, stage="test", test_data=npz["test"], batch_size=batch_size,
                              shuffle=False, data_format="npz", num_workers=0)
    test_logs = model_obj.evaluate(test_gen, metrics=["logloss", "AUC"])
    improved = [h["epoch"] for h in history if h["improved"]]
    return {
        "model": model,
        "library": LIBRARY,
        "seed": seed,
        "val": {"auc": float(val_logs["AUC"]), "logloss": float(val_logs["logloss"])},
        "test": {"auc": float(test_logs["AUC"]), "logloss": float(test_logs["logloss"])},
        "best_epoch": improved[-1] if improved else None,
        "epochs_run": len(history),
        "train_seconds": round(train_seconds, 2),
        "params": params,
        "num_parameters": int(n_params),
        "history": history,
        "data": {"path": str(Path(args.data).resolve()), "rows": {k: int(v) for k, v in npz_rows(npz).items()}},
        "fuxictr_src": _src_commit(args.fuxictr_src),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _src_commit(fuxictr_src):
    stamp = Path(fuxictr_src) / "FUXICTR_SRC_COMMIT"  # written by tools/peers/fuxictr_src.sh
    return stamp.read_text().strip() if stamp.exists() else str(Path(fuxictr_src).resolve())


def npz_rows(npz):
    return {k: np.load(v)[LABEL].shape[0] for k, v in npz.items()}


# ----------------------------------------------------------------------------- summary

def _mean_std(values):
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None  # sample std, ddof=1
    return mean, std


def _fmt(mean, std, digits=4):
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarize(out, models):
    rows = []
    summary = {"library": LIBRARY, "std": "sample standard deviation over seeds (ddof=1); null with one seed",
               "models": {}}
    for model in models:
        runs = []
        for f in sorted((out / model).glob("seed_*/metrics.json")):
            runs.append(json.loads(f.read_text()))
        if not runs:
            continue
        entry = {"seeds": [r["seed"] for r in runs], "n": len(runs)}
        for split in ("val", "test"):
            for metric in ("auc", "logloss"):
                m, s = _mean_std([r[split][metric] for r in runs])
                entry[f"{split}_{metric}"] = {"mean": m, "std": s}
        entry["epochs_run"] = [r["epochs_run"] for r in runs]
        entry["best_epoch"] = [r["best_epoch"] for r in runs]
        m, s = _mean_std([r["train_seconds"] for r in runs])
        entry["train_seconds"] = {"mean": m, "std": s}
        entry["params"] = runs[0]["params"]
        summary["models"][model] = entry
        rows.append(f"| {model} | {len(runs)} | {_fmt(**entry['test_auc'])} | {_fmt(**entry['test_logloss'])} "
                    f"| {_fmt(**entry['val_auc'])} | {', '.join(map(str, entry['epochs_run']))} "
                    f"| {', '.join(map(str, entry['best_epoch']))} | {entry['train_seconds']['mean']:.0f} |")
    table = ["| model | seeds | test AUC | test logloss | val AUC | epochs run | best epoch | train s (mean) |",
             "|---|---|---|---|---|---|---|---|"] + rows
    summary["markdown"] = "\n".join(table)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary["markdown"]


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr),
                                  logging.FileHandler(out / "run_fuxictr.log")])
    overrides = _parse_sets(args.set, args.models)
    ddir, npz, tz = prepare_data(args.data, out, rebuild=args.rebuild_data)
    for model in args.models:
        for seed in args.seeds:
            run_dir = out / model / f"seed_{seed}"
            metrics_file = run_dir / "metrics.json"
            if metrics_file.exists() and not args.force:
                logging.info("skip %s seed %d: %s exists (--force to re-run)", model, seed, metrics_file)
                continue
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            handler = logging.FileHandler(run_dir / "train.log")
            logging.getLogger().addHandler(handler)
            try:
                logging.info("=== %s seed %d on %s (timezone %s) ===", model, seed, args.data, tz)
                metrics = run_one(model, seed, ddir, npz, args, overrides, run_dir)
            finally:
                logging.getLogger().removeHandler(handler)
                handler.close()
            tmp = metrics_file.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(metrics, indent=1))
            tmp.replace(metrics_file)
            logging.info("%s seed %d: test AUC %.4f logloss %.4f, %d epochs (best %s), %.0fs", model, seed,
                         metrics["test"]["auc"], metrics["test"]["logloss"], metrics["epochs_run"],
                         metrics["best_epoch"], metrics["train_seconds"])
    assert "mdaf_rec" not in sys.modules and "torchrec" not in sys.modules
    table = summarize(out, args.models)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
