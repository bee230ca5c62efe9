"""MDAF and the baselines on TorchRec tables: shapes, gradients, gate, padding, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_batch, small_spec
from device_guards import HostSyncError, no_host_sync
from mdaf_rec.config import ConfigError, FeaturesConfig, ModelConfig, load_config
from mdaf_rec.data.batch import build_kjt
from mdaf_rec.features import FeatureSpec
from mdaf_rec.models.ctr import CTRTrain
from mdaf_rec.models.embeddings import InputIdError, check_sequence_features, check_static_features
from mdaf_rec.models.factory import build_model
from mdaf_rec.models.fusion import GatedFusion
from mdaf_rec.models.research_api import MDAF_BST, MDAF_Mamba

MODELS = ["mdaf_mamba", "mdaf_bst", "dcnv3", "mamba4rec", "bst"]


def _model(name: str, spec=None, **cfg_kwargs):
    torch.manual_seed(0)
    spec = spec or small_spec()
    cfg = ModelConfig(name=name, **cfg_kwargs)
    cfg.bst.num_heads = 4
    return build_model(spec, cfg), spec


@pytest.mark.parametrize("name", MODELS)
def test_output_shapes(name: str) -> None:
    model, spec = _model(name, small_spec(extra_sparse=["brand"], dense=["price"]))
    model.eval()
    batch = random_batch(spec, batch_size=12)
    out = model.score(batch)
    assert out.logit.shape == (12,)
    probs = model(batch)
    assert probs.shape == (12,) and bool(((probs > 0) & (probs < 1)).all())
    if name.startswith("mdaf"):
        probs2, gate = model(batch, return_gate=True)
        assert gate.shape == (12, 1)
        torch.testing.assert_close(probs, probs2)
        assert out.lcn_logit.shape == (12,) and out.ecn_logit.shape == (12,)
    else:
        with pytest.raises(ValueError, match="no fusion gate"):
            model(batch, return_gate=True)


def test_vector_gate_shape() -> None:
    model, spec = _model("mdaf_bst", gate="vector")
    _, gate = model(random_batch(spec, batch_size=5), return_gate=True)
    assert gate.shape == (5, spec.sequence_dim)


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    model, spec = _model(name, small_spec(dense=["price"]) if name in ("mdaf_mamba", "dcnv3") else None)
    train = CTRTrain(model)
    loss, out = train(random_batch(spec, batch_size=64, seed=1))
    loss.backward()
    missing = [n for n, p in train.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0.0]
    assert not missing, f"parameters without gradient: {missing}"
    assert out.logit.shape == (64,) and torch.isfinite(out.loss)


def test_tri_bce_adds_dcnv3_side_losses_to_mdaf() -> None:
    model, spec = _model("mdaf_mamba")
    model.eval()
    batch = random_batch(spec, batch_size=64, seed=2)
    with_side, _ = CTRTrain(model, tri_bce=True)(batch)
    plain, _ = CTRTrain(model, tri_bce=False)(batch)
    out = model.score(batch)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    main = bce(out.logit, batch.labels)
    expected = main + sum(
        torch.clamp(bce(side, batch.labels) - main, min=0) * bce(side, batch.labels)
        for side in (out.lcn_logit, out.ecn_logit)
    )
    torch.testing.assert_close(plain, main)
    torch.testing.assert_close(with_side, expected)


@pytest.mark.parametrize("name", ["mdaf_mamba", "mdaf_bst", "mamba4rec", "bst"])
def test_score_of_a_sample_does_not_depend_on_its_batch(name: str) -> None:
    """Histories of other samples (and so the amount of padding around this one) never matter."""
    model, spec = _model(name)
    model.eval()
    lengths = torch.tensor([0, 8, 3, 1, 5])
    batch = random_batch(spec, batch_size=5, seed=3, lengths=lengths)
    together = model.score(batch).logit
    for i in range(5):
        alone = model.score(_take(batch, i)).logit
        torch.testing.assert_close(alone, together[i : i + 1], atol=1e-6, rtol=0)


def _take(batch, i: int):
    from mdaf_rec.data.batch import Batch, build_kjt

    def one(kjt):
        d = kjt.to_dict()
        keys = list(d)
        return build_kjt(keys, [d[k].to_dense()[i] for k in keys], [d[k].lengths()[i : i + 1].long() for k in keys])

    return Batch(
        static_features=one(batch.static_features),
        sequence_features=one(batch.sequence_features),
        dense_features=batch.dense_features[i : i + 1],
        labels=batch.labels[i : i + 1],
        user_id=batch.user_id[i : i + 1],
        row_index=batch.row_index[i : i + 1],
    )


def test_gated_fusion_formula_and_range() -> None:
    fusion = GatedFusion(4)
    with torch.no_grad():
        fusion.gate.weight.copy_(torch.tensor([[100.0, 0, 0, 0, -100.0, 0, 0, 0]]))
        fusion.gate.bias.zero_()
    s = torch.tensor([[1.0, 2, 3, 4], [0.01, 0, 0, 0], [0.0, 0, 0, 0]])
    q = torch.tensor([[0.0, 0, 0, 0], [0.0, 0, 0, 0], [1.0, 1, 1, 1]])
    fused, gate = fusion(s, q)
    assert bool(((gate >= 0) & (gate <= 1)).all())
    assert gate[0].item() == pytest.approx(1.0) and gate[1].item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())
    assert gate[2].item() == pytest.approx(0.0, abs=1e-30)
    torch.testing.assert_close(fused, gate * s + (1 - gate) * q)
    torch.testing.assert_close(fused[0], s[0])
    torch.testing.assert_close(fused[2], q[2])


def _with_values(kjt, values, lengths=None):
    return type(kjt)(keys=kjt.keys(), values=values, lengths=kjt.lengths() if lengths is None else lengths)


def test_out_of_range_and_negative_ids_name_the_feature() -> None:
    spec = small_spec()
    batch = random_batch(spec, batch_size=4)
    check_static_features(batch.static_features, spec)
    check_sequence_features(batch.sequence_features, spec)
    values = batch.static_features.values().clone()
    values[4] = 50  # first id of the second key ("item"), table has 200 rows: fine
    check_static_features(_with_values(batch.static_features, values), spec)
    values[0] = 50  # "user" table has 50 rows: out of range
    with pytest.raises(InputIdError, match="'user'.*id 50.*\\[0, 50\\)"):
        check_static_features(_with_values(batch.static_features, values), spec)
    batch = random_batch(spec, batch_size=4, lengths=torch.tensor([1, 1, 1, 1]))
    values = batch.sequence_features.values().clone()
    values[5] = -3  # second sample of "item_history"
    with pytest.raises(InputIdError, match="'item_history'.*id -3"):
        check_sequence_features(_with_values(batch.sequence_features, values), spec)


def test_sequence_lengths_are_checked_where_data_enters() -> None:
    spec = small_spec(max_history=3)
    ones, three = torch.ones(2, dtype=torch.long), torch.tensor([3, 1])
    good = build_kjt(spec.sequence_keys, [torch.tensor([5, 6]), torch.arange(2, 6), torch.tensor([2, 3]),
                                          torch.arange(2, 6)], [ones, three, ones, three])
    check_sequence_features(good, spec)
    four = torch.tensor([4, 0])  # 4 > max_history
    with pytest.raises(InputIdError, match="'item_history': a history has 4 entries.*max_history=3"):
        check_sequence_features(build_kjt(spec.sequence_keys, [torch.tensor([5, 6]), torch.arange(2, 6),
                                                               torch.tensor([2, 3]), torch.arange(2, 6)],
                                          [ones, four, ones, four]), spec)
    other = torch.tensor([2, 2])  # category history lengths differ from the item history's
    with pytest.raises(InputIdError, match="'item_history' and 'category_history' have unequal history lengths"):
        check_sequence_features(build_kjt(spec.sequence_keys, [torch.tensor([5, 6]), torch.arange(2, 6),
                                                               torch.tensor([2, 3]), torch.arange(2, 6)],
                                          [ones, three, ones, other]), spec)
    with pytest.raises(InputIdError, match="'item': every sample needs exactly one target id"):
        check_sequence_features(build_kjt(spec.sequence_keys, [torch.tensor([5, 6]), torch.arange(2, 6),
                                                               torch.tensor([2, 3]), torch.arange(2, 6)],
                                          [torch.tensor([2, 0]), three, ones, three]), spec)
    reordered = build_kjt(list(reversed(spec.sequence_keys)), [torch.arange(2, 6), torch.tensor([2, 3]),
                                                                torch.arange(2, 6), torch.tensor([5, 6])],
                          [three, ones, three, ones])
    with pytest.raises(InputIdError, match="sequence features: keys .* expected \\['item', 'item_history'"):
        check_sequence_features(reordered, spec)


def test_config_errors_name_the_key(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  mamba:\n    d_stat: 8\n")
    with pytest.raises(ConfigError, match="model.mamba.d_stat"):
        load_config(bad)
    with pytest.raises(ConfigError, match="features.static_dim"):
        load_config(overrides=["features.static_dim=0"])
    with pytest.raises(ConfigError, match="model.bst.num_heads"):
        load_config(overrides=["model.bst.num_heads=3"])
    with pytest.raises(ConfigError, match="model.head_dropout.*number"):
        load_config(overrides=["model.head_dropout=high"])
    with pytest.raises(ConfigError, match="unknown config key 'model.nam'"):
        load_config(overrides=["model.nam=bst"])
    with pytest.raises(ConfigError, match="features.id_spaces.user.*no vocabulary"):
        FeatureSpec.build(FeaturesConfig(), {"item": 10, "category": 10})
    cfg = load_config(overrides=["model.mamba.d_state=8", "features.extra_sparse=[brand]"])
    assert cfg.model.mamba.d_state == 8 and cfg.features.extra_sparse == ["brand"]


def test_tables_follow_the_spec() -> None:
    spec = small_spec(extra_sparse=["brand"])
    bags = {c.name: (c.feature_names, c.embedding_dim, c.num_embeddings) for c in spec.embedding_bag_configs()}
    assert bags == {
        "static_user": (["user"], 8, 50),
        "static_item": (["item"], 8, 200),
        "static_category": (["category"], 8, 20),
        "static_hour": (["hour"], 8, 24),
        "static_dayofweek": (["dayofweek"], 8, 7),
        "static_brand": (["brand"], 8, 30),
    }
    seqs = {c.name: (c.feature_names, c.embedding_dim, c.num_embeddings) for c in spec.embedding_configs()}
    # Target and history of an id space share one table.
    assert seqs == {
        "sequence_item": (["item", "item_history"], 32, 200),
        "sequence_category": (["category", "category_history"], 32, 20),
    }
    model, _ = _model("mdaf_mamba", spec)
    meta = build_model(spec, ModelConfig(name="mdaf_mamba"), table_device="meta")
    tables = [n for n, p in meta.named_parameters() if p.is_meta]
    assert len(tables) == 8 and all("embedding" in n for n in tables)
    assert not [n for n, p in meta.named_parameters() if not p.is_meta and "embedding_bag" in n]


@pytest.mark.parametrize("cls", [MDAF_Mamba, MDAF_BST])
def test_research_code_interface(cls) -> None:
    torch.manual_seed(0)
    model = cls(item_vocab_size=300, category_vocab_size=30, user_vocab_size=40, embedding_dim=32, max_history=6)
    model.eval()
    g = torch.Generator().manual_seed(0)
    hist = torch.randint(1, 300, (3, 4), generator=g)
    cats = torch.randint(1, 30, (3, 4), generator=g)
    hist[2, :2] = 0  # sample 2 has 2 history entries
    cats[2, :2] = 0
    other = {"user_id": torch.tensor([1, 2, 3]), "hour": torch.tensor([0, 5, 23]), "dayofweek": torch.tensor([0, 3, 6])}
    args = (torch.tensor([5, 6, 7]), torch.tensor([1, 2, 3]))
    probs, gate = model(*args, hist, cats, other, return_gate=True)
    assert probs.shape == (3,) and gate.shape == (3, 1)
    # Padding never changes a result: right-padding and extra padding columns give the same scores.
    right = torch.zeros(3, 9, dtype=torch.long)
    right_c = torch.zeros(3, 9, dtype=torch.long)
    for i in range(3):
        valid = hist[i][hist[i] != 0]
        right[i, : len(valid)] = valid
        right_c[i, : len(valid)] = cats[i][hist[i] != 0]
    torch.testing.assert_close(model(*args, right, right_c, other), probs, atol=1e-6, rtol=0)
    # Only the most recent max_history entries are used.
    recent, recent_c = torch.randint(1, 300, (3, 6), generator=g), torch.randint(1, 30, (3, 6), generator=g)
    older, older_c = torch.randint(1, 300, (3, 5), generator=g), torch.randint(1, 30, (3, 5), generator=g)
    torch.testing.assert_close(
        model(*args, torch.cat([older, recent], 1), torch.cat([older_c, recent_c], 1), other),
        model(*args, recent, recent_c, other),
    )
    with pytest.raises(TypeError, match="item_embed_dim=64"):
        cls(item_vocab_size=300, category_vocab_size=30, user_vocab_size=40, item_embed_dim=64)


def test_research_code_keywords_map_onto_the_config() -> None:
    bst = MDAF_BST(
        item_vocab_size=300, category_vocab_size=30, user_vocab_size=40, embedding_dim=32, bst_embed_dim=32,
        bst_max_seq_len=12, bst_num_transformer_layers=1, bst_num_heads=2, bst_d_ff=48, bst_dropout=0.0,
        dcnv3_dropout=0.0,
    )
    assert bst.spec.max_history == 12 and len(bst.model.sequence_branch.encoder.layers) == 1
    assert bst.model.static_branch.dcnv3.lcn.layers[0].dropout.p == 0.0
    mamba = MDAF_Mamba(
        item_vocab_size=300, category_vocab_size=30, user_vocab_size=40, embedding_dim=32, mamba_hidden_dim=32,
        mamba_num_layers=1, mamba_d_state=8, item_embed_dim=32, category_embed_dim=32, static_embed_dim=16,
    )
    assert mamba.model.sequence_branch.encoder.mamba_layers[0].mamba.A_log.shape == (64, 8)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['mamba_layers'\\]"):
        MDAF_Mamba(item_vocab_size=300, category_vocab_size=30, user_vocab_size=40, mamba_layers=2)
    with pytest.raises(TypeError, match="bst_embed_dim \\(64\\) must equal embedding_dim \\(128\\)"):
        MDAF_BST(item_vocab_size=300, category_vocab_size=30, user_vocab_size=40, bst_embed_dim=64)


@pytest.mark.parametrize("cls", [MDAF_Mamba, MDAF_BST])
def test_research_code_model_is_the_training_model(cls) -> None:
    """The research interface holds the TorchRec model where CTRTrain does: its state dict loads into the
    training wrapper of ``build_model(spec, model_config)`` (and back), which then scores the same."""
    torch.manual_seed(0)
    research = cls(item_vocab_size=300, category_vocab_size=30, user_vocab_size=40, embedding_dim=32, max_history=6)
    research.eval()
    torch.manual_seed(1)
    train = CTRTrain(build_model(research.spec, research.model_config)).eval()
    assert list(train.state_dict()) == list(research.state_dict())
    assert all(k.startswith("model.") for k in research.state_dict())
    inputs = _seed_inputs()
    assert not torch.equal(train.model(research.to_batch(*inputs)), research(*inputs))  # different seeds
    train.load_state_dict(research.state_dict())
    torch.testing.assert_close(train.model(research.to_batch(*inputs)), research(*inputs), atol=0, rtol=0)


def _seed_inputs():
    g = torch.Generator().manual_seed(0)
    other = {"user_id": torch.tensor([1, 2, 3]), "hour": torch.tensor([0, 5, 23]), "dayofweek": torch.tensor([0, 3, 6])}
    return (torch.tensor([5, 6, 7]), torch.tensor([1, 2, 3]), torch.randint(1, 300, (3, 4), generator=g),
            torch.randint(1, 30, (3, 4), generator=g), other)


def test_research_code_wrapper_validates_ids_and_builds_on_the_input_device() -> None:
    model = MDAF_BST(item_vocab_size=300, category_vocab_size=30, user_vocab_size=40, embedding_dim=32, max_history=6)
    target, target_cat, hist, cats, other = _seed_inputs()
    # Tensors the wrapper creates follow the inputs, not the default device (here: meta).
    with torch.device("meta"):
        batch = model.to_batch(target, target_cat, hist, cats, other)
    kjts = (batch.static_features, batch.sequence_features)
    tensors = [batch.dense_features, batch.labels, batch.user_id, batch.row_index]
    tensors += [t for kjt in kjts for t in (kjt.values(), kjt.lengths(), kjt.offsets())]
    assert {t.device for t in tensors} == {torch.device("cpu")}
    bad = hist.clone()
    bad[1, 2] = 300  # the item table has 300 rows
    with pytest.raises(InputIdError, match="'item_history'.*id 300.*\\[0, 300\\)"):
        model(target, target_cat, bad, cats, other)
    with pytest.raises(InputIdError, match="'hour'.*id 24"):
        model(target, target_cat, hist, cats, {**other, "hour": torch.tensor([0, 24, 1])})


@pytest.mark.parametrize("name", MODELS)
def test_forward_and_backward_make_no_host_sync(name: str) -> None:
    """What a GPU step would wait for: no ``.item()``/``int(t)``/``bool(t)``/``torch.equal``/mask indexing
    in the model code (TorchRec's own embedding modules are allowed their input bookkeeping)."""
    model, spec = _model(name, small_spec(dense=["price"]))
    train = CTRTrain(model)
    batch = random_batch(spec, batch_size=32, seed=4)
    with no_host_sync():
        loss, out = train(batch)
        loss.backward()
    assert out.logit.shape == (32,)
    # The guard itself catches what it should: a scalar read, and a KJT helper called by non-TorchRec code.
    with pytest.raises(HostSyncError, match="_local_scalar_dense.*test_models.py"):
        with no_host_sync():
            float(loss.detach())
    fresh = type(batch.sequence_features)(keys=spec.sequence_keys, values=batch.sequence_features.values(),
                                          lengths=batch.sequence_features.lengths())
    with pytest.raises(HostSyncError, match="Tensor.tolist.*test_models.py"):
        with no_host_sync():
            fresh.length_per_key()


@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_numerics(name: str) -> None:
    """Under ``torch.autocast(bfloat16)`` (CPU here; the CUDA path is the same code) logits and gates
    stay float32 and within 0.01 of the float32 model (bf16 keeps 8 significant bits)."""
    model, spec = _model(name, small_spec(max_history=20, sequence_dim=64, static_dim=16, dense=["price"]))
    model.eval()
    batch = random_batch(spec, batch_size=256, seed=5)
    with torch.no_grad():
        ref = model.score(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.score(batch)
    assert out.logit.dtype == torch.float32
    torch.testing.assert_close(out.logit, ref.logit, atol=1e-2, rtol=0)
    if ref.gate is not None:
        assert out.gate.dtype == torch.float32
        torch.testing.assert_close(out.gate, ref.gate, atol=5e-3, rtol=0)
    train = CTRTrain(model.train())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = train(batch)
    loss.backward()
    assert loss.dtype == torch.float32 and all(
        p.grad is None or bool(torch.isfinite(p.grad).all()) for p in train.parameters()
    )


DENSE_MODULES = ["mdaf_rec.models.mamba", "mdaf_rec.models.bst", "mdaf_rec.models.dcnv3", "mdaf_rec.models.fusion",
                 "mdaf_rec.models.head", "mdaf_rec.metrics", "mdaf_rec.distributed"]


def test_dense_modules_import_without_torchrec() -> None:
    """``tools/gpu_check.sh`` runs them on a machine with only torch: they must not import TorchRec/FBGEMM."""
    code = (
        "import sys\n"
        "for name in ('torchrec', 'fbgemm_gpu'):\n"
        "    sys.modules[name] = None  # any import of them raises ImportError\n"
        f"import importlib\nfor m in {DENSE_MODULES!r}:\n    importlib.import_module(m)\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('torchrec', 'fbgemm_gpu') and sys.modules[m])\n"
        "assert not leaked, leaked\n"
    )
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

