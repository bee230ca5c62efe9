"""MDAF's fusion remedies (``model.fusion``, the static tables' own learning rate) and the final scoring's
reliability table and gate profile (:mod:`mdaf_rec.profiles`)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import random_batch, small_spec
from mdaf_rec.config import ConfigError, FusionConfig, ModelConfig, OptimizerConfig, load_config
from mdaf_rec.data.dataset import DatasetError
from mdaf_rec.models.ctr import CTRTrain
from mdaf_rec.models.factory import build_model
from mdaf_rec.models.fusion import GatedFusion
from mdaf_rec.plots import plot_gate_profile
from mdaf_rec.profiles import FinalProfile, group_labels, power_of_two_group, user_activity
from mdaf_rec.sharding import apply_sparse_optimizer, build_optimizer, plan_sharding, shard_model


def _mdaf(**fusion):
    torch.manual_seed(0)
    spec = small_spec()
    return build_model(spec, ModelConfig(name="mdaf_mamba", fusion=FusionConfig(**fusion))), spec


def test_branch_dropout_gives_a_share_of_training_samples_one_branch() -> None:
    torch.manual_seed(0)
    fusion = GatedFusion(4, branch_dropout=0.4)
    s, q = torch.randn(20000, 4), torch.randn(20000, 4) + 5.0
    fused, gate = fusion(s, q)
    static_only = (gate == 1.0).flatten()
    sequential_only = (gate == 0.0).flatten()
    # 0.4 of the rows see one branch, half each: 0.2 ± 4 std (std of a share of 20k rows at 0.2: 0.0028).
    assert abs(static_only.float().mean().item() - 0.2) < 0.012
    assert abs(sequential_only.float().mean().item() - 0.2) < 0.012
    torch.testing.assert_close(fused[static_only], s[static_only])
    torch.testing.assert_close(fused[sequential_only], q[sequential_only])
    # Evaluation: every row mixes both, and the gate is the plain one.
    fusion.eval()
    fused, gate = fusion(s, q)
    plain = torch.sigmoid(fusion.gate(torch.cat([s, q], dim=-1)))
    assert bool(((gate > 0) & (gate < 1)).all())
    torch.testing.assert_close(gate, plain)


def test_gate_stop_gradient_keeps_the_gate_path_out_of_the_branches() -> None:
    torch.manual_seed(0)
    s, q = torch.randn(6, 4), torch.randn(6, 4)
    grads = {}
    for stop in (False, True):
        torch.manual_seed(1)
        fusion = GatedFusion(4, stop_gradient=stop)
        s_, q_ = s.clone().requires_grad_(), q.clone().requires_grad_()
        fused, gate = fusion(s_, q_)
        fused.sum().backward()
        grads[stop] = (s_.grad, gate.detach(), fusion.gate.weight.grad)
    s_grad, gate, w_grad = grads[True]
    # d(Σ fused)/ds = g exactly when the gate does not see s's gradient.
    torch.testing.assert_close(s_grad, gate.expand(-1, 4))
    assert not torch.allclose(grads[False][0], grads[False][1].expand(-1, 4))
    # The gate's own weights still learn, by the same gradient either way.
    torch.testing.assert_close(w_grad, grads[False][2])


def test_gate_bias_init_sets_the_starting_gate() -> None:
    fusion = GatedFusion(8, bias_init=-2.0)
    with torch.no_grad():
        fusion.gate.weight.zero_()
    _, gate = fusion(torch.randn(3, 8), torch.randn(3, 8))
    torch.testing.assert_close(gate, torch.full((3, 1), 1 / (1 + math.exp(2.0))))
    assert GatedFusion(8, mode="vector", bias_init=1.5).gate.bias.tolist() == [1.5] * 8


def test_aux_loss_adds_each_branch_bce() -> None:
    model, spec = _mdaf(aux_loss_weight=0.25)
    train = CTRTrain(model, tri_bce=False, aux_loss_weight=0.25)
    batch = random_batch(spec, batch_size=64, seed=2)
    torch.manual_seed(5)
    loss, _ = train(batch)
    torch.manual_seed(5)  # the same dropout masks
    out = model.score(batch)
    labels = batch.labels.float()
    bce = lambda logit: F.binary_cross_entropy_with_logits(logit, labels)  # noqa: E731
    expected = bce(out.logit) + 0.25 * (bce(out.static_logit) + bce(out.sequential_logit))
    assert out.static_logit.shape == (64,) and not torch.equal(out.static_logit, out.sequential_logit)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.branch_heads.static.weight.grad.abs().sum() > 0
    assert model.branch_heads.sequential.weight.grad.abs().sum() > 0
    model.eval()  # the auxiliary heads score in training only
    out = model.score(batch)
    assert out.static_logit is None and out.sequential_logit is None
    # Off (the default): no heads, no parameters, the plain loss.
    plain, _ = _mdaf()
    assert plain.branch_heads is None
    assert not any("branch_heads" in n for n, _ in plain.named_parameters())


def test_fusion_and_static_table_keys_are_validated() -> None:
    cfg = load_config("mdaf_bst", overrides=["model.fusion.aux_loss_weight=0.1", "model.fusion.branch_dropout=0.2",
                                             "model.fusion.gate_stop_gradient=true", "model.fusion.gate_bias_init=-2",
                                             "optimizer.static_sparse_lr=0.005"])
    assert cfg.model.fusion == FusionConfig(0.1, 0.2, True, -2.0) and cfg.optimizer.static_sparse_lr == 0.005
    for override, match in (
        ("model.fusion.branch_dropout=1.0", "model.fusion.branch_dropout.*\\[0, 1\\)"),
        ("model.fusion.aux_loss_weight=-0.1", "model.fusion.aux_loss_weight.*>= 0"),
        ("model.fusion.gate_stop_gradient=1", "model.fusion.gate_stop_gradient.*true/false"),
        ("model.fusion.gate_bias=1", "unknown config key 'model.fusion.gate_bias'"),
        ("optimizer.static_sparse_lr=0", "optimizer.static_sparse_lr.*> 0"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config("mdaf_mamba", overrides=[override])
    with pytest.raises(ConfigError, match="model.fusion.*not 'dnn'"):
        load_config("dnn", overrides=["model.fusion.branch_dropout=0.1"])
    with pytest.raises(ConfigError, match="optimizer.static_sparse_weight_decay.*'adagrad'"):
        load_config("mdaf_mamba", overrides=["optimizer.sparse=adagrad", "optimizer.static_sparse_weight_decay=1e-4"])
    with pytest.raises(ConfigError, match="optimizer.static_sparse_lr.*fused"):
        load_config("dnn", overrides=["optimizer.sparse=dense", "optimizer.static_sparse_lr=0.01"])


def test_oov_dropout_key_is_validated() -> None:
    cfg = load_config("mdaf_mamba", overrides=['train.oov_dropout={"item": 0.3, "user": 0.1}'])
    assert cfg.train.oov_dropout == {"item": 0.3, "user": 0.1} and load_config("dnn").train.oov_dropout == {}
    managed = ["features.id_mapping=managed", "features.id_spaces.user.rows=300", "features.id_spaces.item.rows=800",
               "features.id_spaces.category.rows=32"]
    for overrides, match in (
        (["train.oov_dropout={item: 1.0}"], "train.oov_dropout.item.*\\[0, 1\\)"),
        (["train.oov_dropout={hour: 0.1}"], "train.oov_dropout.hour.*not a static id field with a vocabulary"),
        (["train.oov_dropout={shop: 0.1}"], "train.oov_dropout.shop.*not a static id field"),
        (["features.id_spaces.item.hash_buckets=100", "train.oov_dropout={item: 0.1}"],
         "train.oov_dropout.item.*hashed ids have no OOV row"),
        (managed + ["train.oov_dropout={item: 0.1}"], "train.oov_dropout.item.*features.id_mapping=vocab"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config("mdaf_mamba", overrides=overrides)
    assert load_config("dnn", overrides=["features.extra_sparse=[shop]", "train.oov_dropout={shop: 0.2}"])


def test_static_tables_get_their_own_learning_rate(tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        train = CTRTrain(build_model(small_spec(), ModelConfig(name="mdaf_mamba"), table_device="meta"))
        cfg = OptimizerConfig(sparse="rowwise_adagrad", sparse_lr=0.1, static_sparse_lr=0.01)
        apply_sparse_optimizer(train, cfg, torch.device("cpu"))
        plan = plan_sharding(train, world_size=1, local_world_size=1, compute_device="cpu", batch_size=32,
                             process_group=dist.group.WORLD)
        optimizer = build_optimizer(shard_model(train, torch.device("cpu"), plan), cfg)
        fused = optimizer.optimizers[0][1]  # [fused tables, dense]
        names = {id(p): n for n, p in fused.params.items()}
        lrs = {}  # table -> the learning rates of the groups holding it
        for group in fused.param_groups:
            for param in group["params"]:
                table = names[id(param)].split(".")[-2]  # ...embedding_bags.static_user.weight
                lrs.setdefault(table, set()).add(round(group["lr"], 6))
        assert {"static_user", "static_item", "sequence_item", "sequence_category"} <= set(lrs), lrs
        assert all(lr == ({0.01} if table.startswith("static_") else {0.1}) for table, lr in lrs.items()), lrs
    finally:
        dist.destroy_process_group()


def test_power_of_two_groups_and_labels() -> None:
    counts = torch.tensor([0, 1, 2, 3, 4, 7, 8, 127, 128, 10_000])
    assert power_of_two_group(counts).tolist() == [0, 1, 2, 2, 3, 3, 4, 7, 8, 8]
    assert group_labels() == ["0", "1", "2–3", "4–7", "8–15", "16–31", "32–63", "64–127", "≥128"]


def test_final_profile_numbers() -> None:
    activity = (np.array([10, 20], np.int64), np.array([1, 40], np.int64))  # user 30: unseen in training
    profile = FinalProfile(activity, torch.device("cpu"))
    probs = torch.tensor([0.05, 0.07, 0.95, 0.55])
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0])
    gate = torch.tensor([[0.2], [0.4], [0.9], [0.6]])
    history = torch.tensor([0, 3, 3, 20])
    users = torch.tensor([10, 20, 30, 20])
    profile.update(probs, labels, gate, history, users)
    out = profile.compute()
    rel = {r["bin"]: r for r in out["reliability"]}
    assert set(rel) == {"0.0–0.1", "0.5–0.6", "0.9–1.0"}
    assert rel["0.0–0.1"]["rows"] == 2 and rel["0.0–0.1"]["mean_pred"] == pytest.approx(0.06)
    assert rel["0.0–0.1"]["observed"] == 0.5 and rel["0.9–1.0"]["observed"] == 1.0
    by_history = {g["group"]: g for g in out["gate_profile"]["history_length"]}
    assert {k: v["rows"] for k, v in by_history.items()} == {"0": 1, "2–3": 2, "16–31": 1}
    assert by_history["2–3"]["mean"] == pytest.approx(0.65) and by_history["2–3"]["std"] == pytest.approx(0.25)
    assert by_history["2–3"]["from_history"] == 0.5
    by_user = {g["group"]: g for g in out["gate_profile"]["user_activity"]}
    assert {k: v["rows"] for k, v in by_user.items()} == {"0": 1, "1": 1, "32–63": 2}
    assert by_user["0"]["mean"] == pytest.approx(0.9) and by_user["32–63"]["mean"] == pytest.approx(0.5)
    # Without gates (single-branch models): the reliability table only; without users: history only.
    plain = FinalProfile(None, torch.device("cpu"))
    plain.update(probs, labels, None, None, users)
    assert set(plain.compute()) == {"reliability"}
    plain.update(probs, labels, gate, history, users)
    assert set(plain.compute()["gate_profile"]) == {"history_length"}


def test_user_activity_counts_training_rows_of_the_scored_users(tmp_path) -> None:
    pq.write_table(pa.table({"user_id": [5, 5, 5, 7, 9, 9]}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"user_id": [9, 5, 11]}), tmp_path / "test.parquet")
    ids, rows = user_activity([tmp_path / "train.parquet"], [tmp_path / "test.parquet"], "user_id")
    assert ids.tolist() == [5, 9] and rows.tolist() == [3, 2]


def test_gate_profile_plot(tmp_path) -> None:
    profile = {"history_length": [{"group": "0", "rows": 5, "mean": 0.8, "std": 0.1, "from_history": 0.0},
                                  {"group": "8–15", "rows": 50, "mean": 0.3, "std": 0.2, "from_history": 0.7}],
               "user_activity": [{"group": "0", "rows": 3, "mean": 0.6, "std": 0.0, "from_history": 0.3}]}
    out = plot_gate_profile(profile, tmp_path / "gate_profile.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="empty gate profile"):
        plot_gate_profile({}, tmp_path / "x.png", title="t")


def test_training_with_the_remedies_writes_the_gate_profile_and_reliability(dataset, tmp_path) -> None:
    """One epoch of MDAF-Mamba with every remedy on (and ``train.oov_dropout``): the final test scoring's reliability table and gate profile
    cover every test row, the plot is written, and ``mdaf-rec eval`` re-scores to the same profile."""
    from test_train import mdaf, train

    run = tmp_path / "run"
    train(dataset, run, "--epochs", "1", "--set", "model.fusion.aux_loss_weight=0.3",
          "--set", "model.fusion.branch_dropout=0.2", "--set", "model.fusion.gate_stop_gradient=true",
          "--set", "model.fusion.gate_bias_init=-1", "--set", "optimizer.static_sparse_lr=0.01",
          "--set", 'train.oov_dropout={"item":0.3}')
    metrics = json.loads((run / "metrics.json").read_text())
    count = metrics["test"]["count"]
    assert sum(r["rows"] for r in metrics["reliability"]) == count
    pred = sum(r["rows"] * r["mean_pred"] for r in metrics["reliability"]) / count
    assert pred == pytest.approx(metrics["test"]["pred_ctr"], rel=1e-9)
    profile = metrics["gate_profile"]
    assert set(profile) == {"history_length", "user_activity"}
    for groups in profile.values():
        assert sum(g["rows"] for g in groups) == count
        mean = sum(g["rows"] * g["mean"] for g in groups) / count
        assert mean == pytest.approx(metrics["gate"]["mean"], rel=1e-9)
    assert (run / "gate_profile.png").stat().st_size > 10_000
    rescored = json.loads(mdaf("eval", "--run", str(run), "--split", "test").stdout)
    assert rescored["gate_profile"] == profile and rescored["reliability"] == metrics["reliability"]


def test_user_activity_names_the_file_and_column_it_cannot_count(tmp_path) -> None:
    pq.write_table(pa.table({"uid": [1, 2]}), tmp_path / "train.parquet")
    with pytest.raises(DatasetError, match="train.parquet.*'user_id'"):
        user_activity([tmp_path / "train.parquet"], [tmp_path / "train.parquet"], "user_id")


def test_fusion_report_tabulates_each_seed_and_the_mean(tmp_path) -> None:
    """``tools/fusion_report.py``: per seed the picked and the lowest validation logloss (from ``metrics.jsonl``), and
    a mean ± sample std line over the finished seeds; a missing seed is named, not averaged."""
    reliability = [{"bin": "0.0–0.1", "rows": 30, "mean_pred": 0.05, "observed": 0.2},
                   {"bin": "0.5–0.6", "rows": 50, "mean_pred": 0.55, "observed": 0.55},
                   {"bin": "0.9–1.0", "rows": 20, "mean_pred": 0.95, "observed": 0.8}]
    for seed, (val_auc, test_auc, logloss) in {1: (0.80, 0.78, 0.5), 2: (0.84, 0.80, 0.9)}.items():
        run = tmp_path / "mdaf_mamba+x" / f"seed_{seed}"
        run.mkdir(parents=True)
        epochs = [{"epoch": e, "val": {"auc": 0.7, "logloss": ll}} for e, ll in ((1, 0.6), (2, 0.52), (3, logloss))]
        (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
        (run / "metrics.json").write_text(json.dumps({
            "val": {"auc": val_auc, "logloss": logloss}, "best_epoch": 3, "epochs_run": 4, "reliability": reliability,
            "test": {"auc": test_auc, "logloss": logloss, "calibration": 1.0}, "gate": {"mean": 0.4 + 0.1 * seed},
            "gate_profile": {"history_length": [{"group": "16–31", "rows": 100, "mean": 0.5, "from_history": 0.25}]}}))
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(repo / "tools" / "fusion_report.py"), "--out", str(tmp_path), "--rows",
                          "mdaf_mamba+x", "--seeds", "1", "2", "3"], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    # ECE = (30·0.15 + 0 + 20·0.15) / 100; half the rows predicted outside [0.1, 0.9]
    assert "| mdaf_mamba+x | 1 | 0.8000 | 0.7800 | 0.5000 | 1.000 | 0.0750 | 50.0% (0.20 / 0.80) | 3/4 | " \
           "0.500 / 0.500 (3) | 0.500 | 25.0% |" in lines
    assert "| mdaf_mamba+x | 2 | 0.8400 | 0.8000 | 0.9000 | 1.000 | 0.0750 | 50.0% (0.20 / 0.80) | 3/4 | " \
           "0.900 / 0.520 (2) | 0.600 | 25.0% |" in lines
    assert "| mdaf_mamba+x | 3 | (not run) | | | | | | | | | |" in lines
    assert ("| mdaf_mamba+x | mean ± std (2) | 0.8200 ± 0.0283 | 0.7900 ± 0.0141 | 0.7000 ± 0.2828 | 1.000 ± 0.000 | "
            "0.0750 ± 0.0000 | 50.0% ± 0.0% | | | 0.550 ± 0.071 | 25.0% ± 0.0% |") in lines
