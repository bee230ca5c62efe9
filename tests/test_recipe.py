"""The learning-recipe options: pooled histories in the static branch, the DNN baseline, table weight decay,
learning-rate decay on plateau and the table initialisation range."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch

from mdaf_rec.config import ConfigError, FeaturesConfig, ModelConfig, load_config
from mdaf_rec.data.dataset import Dataset
from mdaf_rec.data.loader import BatchLoader
from mdaf_rec.data.vocab import Vocabularies
from mdaf_rec.features import FeatureSpec
from mdaf_rec.models.baselines import DNNCTR
from mdaf_rec.models.embeddings import InputIdError, StaticEmbeddingArch, check_static_features
from mdaf_rec.train_state import TrainState
from test_train import mdaf

REPO = Path(__file__).resolve().parents[1]


def _pooled_world(dataset: Path, **features):
    cfg = FeaturesConfig(max_history=6, static_dim=4, pooled_history=True, **features)
    opened = Dataset.open(dataset)
    vocabs = Vocabularies.load_or_build(opened, cfg)
    spec = FeatureSpec.build(cfg, vocabs.sizes)
    batch = next(iter(BatchLoader(opened, "train", spec, vocabs, 64)))
    return spec, batch


def test_pooled_history_is_the_mean_of_the_static_rows(dataset: Path) -> None:
    spec, batch = _pooled_world(dataset)
    assert spec.static_input_keys == ["user", "item", "category", "hour", "dayofweek", "item_history", "category_history"]
    assert spec.num_static_fields == 7
    static, sequence = batch.static_features.to_dict(), batch.sequence_features.to_dict()
    for key in spec.pooled_history_keys:  # the loader hands the static branch the sequence branch's history ids
        assert torch.equal(static[key].values(), sequence[key].values())
        assert torch.equal(static[key].lengths(), sequence[key].lengths())
    lengths = static["item_history"].lengths()
    assert int(lengths.min()) == 0 and int(lengths.max()) == 6, "the batch should hold empty and full histories"
    check_static_features(batch.static_features, spec)

    arch = StaticEmbeddingArch(spec, device=torch.device("cpu"))
    fields = arch(batch.static_features, batch.dense_features)  # [B, 7, 4]
    table = arch.embedding_bag_collection.embedding_bags["static_item"].weight
    item_field = spec.static_input_keys.index("item_history")
    for row, ids in enumerate(static["item_history"].to_dense()):
        expected = table[ids].mean(0) if len(ids) else torch.zeros(spec.static_dim)
        torch.testing.assert_close(fields[row, item_field], expected)
    # the target id reads the same table, one row per sample
    torch.testing.assert_close(fields[:, spec.static_input_keys.index("item")], table[static["item"].values()])


def test_a_too_long_pooled_history_names_the_feature(dataset: Path) -> None:
    spec, batch = _pooled_world(dataset)
    narrow = FeatureSpec(**{**spec.__dict__, "max_history": 3})
    with pytest.raises(InputIdError, match="static feature 'item_history': a history has 6 entries"):
        check_static_features(batch.static_features, narrow)


def test_table_init_scale_bounds_the_static_rows() -> None:
    spec = FeatureSpec.build(FeaturesConfig(static_dim=4, table_init_scale=1e-3), {"user": 500, "item": 900, "category": 40})
    arch = StaticEmbeddingArch(spec, device=torch.device("cpu"))
    weights = torch.cat([bag.weight.detach().flatten() for bag in arch.embedding_bag_collection.embedding_bags.values()])
    assert float(weights.abs().max()) <= 1e-3 and float(weights.std()) > 4e-4  # uniform in [-s, s]: std s/√3


def test_dnn_is_an_mlp_over_every_static_field(dataset: Path) -> None:
    spec, batch = _pooled_world(dataset)
    model = DNNCTR(spec, ModelConfig(name="dnn"), table_device=torch.device("cpu"))
    assert model.mlp.mlp[0].in_features == 7 * 4 and [m.out_features for m in model.mlp.mlp if hasattr(m, "out_features")] == [256, 128, 64, 1]
    logit = model.score(batch).logit
    assert logit.shape == (64,) and torch.isfinite(logit).all()
    logit.sum().backward()  # every table a field reads gets a gradient, pooled histories included
    assert float(model.embeddings.embedding_bag_collection.embedding_bags["static_category"].weight.grad.abs().sum()) > 0


# One training step on the same batches under each of several override lists (one process: one import of
# torch/TorchRec, one process group); prints, per list, how much each table moved.
STEP = """
import itertools, json, sys
import torch
from mdaf_rec.config import load_config
from mdaf_rec.distributed import init_distributed
from mdaf_rec.train import open_session, train_steps
data, out = sys.argv[1:3]
env = init_distributed()
def local(t):  # a sharded (table_wise) table's one local shard, or a data-parallel table
    return t.local_shards()[0].tensor if hasattr(t, "local_shards") else t
moves = []
for i, overrides in enumerate(json.loads(sys.argv[3])):
    cfg = load_config("configs/dnn.yaml", [f"data.path={data}", "features.static_dim=4", "train.batch_size=128",
                                           "train.threads=1", "train.pipeline=false", *overrides])
    session = open_session(cfg, f"{out}/{i}", env)
    before = {k: local(v).detach().clone() for k, v in session.model.state_dict().items() if "embedding_bags" in k}
    for g in session.optimizer.param_groups:
        g["lr"] *= float(cfg.train.lr_decay_on_plateau or 1.0)  # what an epoch without progress does
    batches = list(itertools.islice(iter(session.loader("train", epoch=0, train=True)), 2))
    for _ in train_steps(session, iter(batches)):
        pass
    after = session.model.state_dict()
    moves.append({k: float((local(after[k]) - v).abs().sum()) for k, v in before.items()})
print(json.dumps(moves))
"""


def _table_moves(dataset: Path, out: Path, *overrides: List[str]) -> List[dict]:
    """How much each table moved in one step, per override list (one subprocess for all)."""
    proc = subprocess.run([sys.executable, "-c", STEP, str(dataset), str(out), json.dumps(overrides)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_table_weight_decay_and_learning_rate_reach_the_fused_tables(dataset: Path, tmp_path: Path) -> None:
    sgd = ["optimizer.sparse=sgd", "optimizer.sparse_lr=0.1"]
    plain, decayed, sgd_plain, slowed = _table_moves(
        dataset, tmp_path, [], ["optimizer.sparse_weight_decay=0.5"], sgd, [*sgd, "train.lr_decay_on_plateau=0.01"])
    key = next(k for k in plain if "static_item" in k)  # a fused (table_wise) table
    # L2 decay adds 0.5·w to each looked-up row's gradient (row-wise Adagrad): the rows move differently
    # (FBGEMM ignored weight_decay without a weight_decay_mode, so both were equal before)
    assert abs(decayed[key] - plain[key]) > 0.01 * plain[key], (plain[key], decayed[key])
    # the fused optimizer reads its learning rate from the param group: SGD moves 100x less
    # (not exactly: the second step sees other weights and dense layers)
    assert slowed[key] == pytest.approx(sgd_plain[key] / 100, rel=0.15), (sgd_plain[key], slowed[key])


@pytest.mark.parametrize("monitor", [None, {"auc": 1.0, "logloss": -1.0}])
def test_lr_decay_and_best_epoch_follow_the_monitored_score(dataset: Path, tmp_path: Path, monitor) -> None:
    run = tmp_path / "run"
    chosen = ["--set", f"train.monitor={json.dumps(monitor)}"] if monitor else []
    mdaf("train", "--config", "configs/dnn.yaml", "--data", str(dataset), "--out", str(run), "--epochs", "5",
         "--set", "features.static_dim=4", "--set", "train.batch_size=256", "--set", "train.threads=1",
         "--set", "train.patience=5", "--set", "train.lr_decay_on_plateau=0.5", "--set", "optimizer.lr=0.01",
         "--set", "optimizer.sparse_lr=0.3", *chosen)
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    weights = monitor or {"auc": 1.0}
    best, bad, best_epoch = -math.inf, 0, 0
    for e in epochs:  # the scale halves after every epoch without a better validation score
        score = sum(w * e["val"][name] for name, w in weights.items())
        assert e["monitor"] == pytest.approx(score, abs=1e-12)
        if score > best:
            best, best_epoch = score, e["epoch"]
        else:
            bad += 1
        assert e["lr_scale"] == 0.5 ** bad, epochs
    assert bad >= 1, "these learning rates overfit this tiny set within 5 epochs (val AUC and logloss worsen)"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_epoch"] == best_epoch  # the best checkpoint is the monitored epoch, and it is re-scored:
    assert metrics["val"]["logloss"] == pytest.approx(epochs[best_epoch - 1]["val"]["logloss"], abs=1e-9)


def test_monitor_key_is_validated_and_old_states_read_as_auc() -> None:
    assert load_config("dnn").train.monitor == {"auc": 1.0}
    assert load_config("dnn", overrides=["train.monitor={logloss: -1}"]).train.monitor == {"logloss": -1}
    for value, match in (("{}", "train.monitor.*names no metric"), ("{recall: 1}", "train.monitor.recall.*not one of"),
                         ("{auc: 0}", "train.monitor.auc.*non-zero number")):
        with pytest.raises(ConfigError, match=match):
            load_config("dnn", overrides=[f"train.monitor={value}"])
    # a checkpoint written before train.monitor holds its best validation AUC as best_auc
    assert TrainState.from_json({"epochs_done": 2, "best_auc": 0.71, "best_epoch": 2}).best_score == 0.71


def _run_results_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_results", REPO / "tools" / "run_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_table_says_ahead_only_beyond_the_seed_spread() -> None:
    rr = _run_results_module()

    def runs(*aucs: float):
        return rr.aggregate([{"val": {"auc": a, "logloss": 0.6, "gauc": a}, "test": {"auc": a, "logloss": 0.6, "gauc": a},
                              "best_epoch": 1, "epochs_run": 2, "samples_per_sec": 100.0} for a in aucs])

    rows = {"dnn": runs(0.680, 0.690, 0.700), "bst": runs(0.700, 0.701, 0.702), "mdaf_bst": runs(0.712, 0.713, 0.714)}
    assert rows["dnn"]["test.auc"] == pytest.approx((0.690, 0.010))  # sample std (ddof 1)
    text = rr.table(rows, {}, None)
    # +0.023 over dnn beats dnn's std 0.010; +0.012 over bst beats both stds (0.001)
    assert "**mdaf_bst** ahead of: dnn (+0.0230), bst (+0.0120); not ahead of: none." in text
    rows["mdaf_bst"] = runs(0.695, 0.700, 0.705)  # +0.010 over dnn is within dnn's std; -0.001 vs bst
    text = rr.table(rows, {}, None)
    assert "**mdaf_bst** ahead of: none; not ahead of: dnn (+0.0100), bst (-0.0010)." in text


def test_results_table_of_finished_runs_names_what_did_not_run(tmp_path, monkeypatch) -> None:
    rr = _run_results_module()
    metrics = {"val": {"auc": 0.7, "logloss": 0.6, "gauc": 0.7}, "test": {"auc": 0.69, "logloss": 0.61, "gauc": 0.68},
               "best_epoch": 2, "epochs_run": 2}
    for folder, seed, speed in [("dnn", 1, 1234.4), ("dnn", 3, 24355.0), ("dnn+small", 2, 800.0)]:
        (tmp_path / folder / f"seed_{seed}").mkdir(parents=True)
        (tmp_path / folder / f"seed_{seed}" / "metrics.json").write_text(
            json.dumps({**metrics, "samples_per_sec": speed}))
    monkeypatch.setattr(sys, "argv", ["run_results.py", "--data", "nowhere", "--out", str(tmp_path), "--models", "dnn",
                                      "dcnv3", "--seeds", "1", "2", "3", "--variant", "small: x=1", "--only-finished"])
    rr.main()  # would train (and fail: no data) if it started any run
    text = (tmp_path / "results.md").read_text()
    assert ("| dnn | mdaf_rec | 0.7000 ± 0.0000 | 0.6900 ± 0.0000 | 0.6100 ± 0.0000 | 2/2, 2/2 | 1,234; 24,355 |"
            in text)  # the seeds' samples/s, not their mean
    assert "| dnn [small] | mdaf_rec | 0.7000 ± 0.0000 | 0.6900 ± 0.0000 | 0.6100 ± 0.0000 | 2/2 | 800 |" in text
    assert "Not run: dnn seed 2; dnn [small] seeds 1 3; dcnv3 seeds 1 2 3; dcnv3 [small] seeds 1 2 3." in text
