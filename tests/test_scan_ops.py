"""Tests for mdaf_rec.ops: every selective scan implementation against the per-step reference,
the compiled CPU operator (custom op, fake kernel, autograd), the dispatcher's choices, the
read-at-positions form and the exportable form."""

import logging
import math
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mdaf_rec.ops import causal_conv1d_silu, scan_cpu, selective_scan
from mdaf_rec.ops.scan_reference import selective_scan_reference
from mdaf_rec.ops.scan_torch import gpu_blocks, selective_scan_torch
from mdaf_rec.ops.selective_scan import BACKENDS, scan_backend, selective_scan_fn

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

needs_cpp = pytest.mark.skipif(
    not scan_cpu.available(),
    reason="compiled CPU selective scan unavailable (no C++ compiler / ninja, or the build failed; "
    "see the warning of mdaf_rec.ops.scan_cpu)",
)


pytestmark = pytest.mark.usefixtures("one_thread")  # the kernels' results must not depend on the threads


def max_err(a, b):
    return (a - b).abs().max().item()


def close(a, b, dtype):
    """Max abs error <= TOL; for float32 relative to the magnitude when that exceeds 1
    (e.g. dL/dA sums batch x length terms of size ~1)."""
    scale = 1.0 if dtype == torch.float64 else max(1.0, b.abs().max().item())
    return max_err(a, b) <= TOL[dtype] * scale


def make_scan_inputs(
    bc: str,
    dtype: torch.dtype,
    with_d: bool = True,
    with_z: bool = True,
    with_bias: bool = True,
    batch: int = 3,
    dim: int = 6,
    length: int = 11,
    d_state: int = 4,
    seed: int = 0,
):
    """Random scan inputs; ``bc`` is "const" (dim, N), "var" (B, N, L) or "grouped" (B, G, N, L)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    bshape = {"const": (dim, d_state), "var": (batch, d_state, length),
              "grouped": (batch, 2, d_state, length)}[bc]
    x = {
        "u": rnd(batch, dim, length),
        # positive step sizes, as in Mamba (also without softplus): a stable, decaying scan
        "delta": rnd(batch, dim, length, scale=0.5).abs(),
        "A": -torch.rand(dim, d_state, generator=g, dtype=torch.float64).mul(2).add(0.1).to(dtype),
        "B": rnd(*bshape),
        "C": rnd(*bshape),
        "D": rnd(dim) if with_d else None,
        "z": rnd(batch, dim, length) if with_z else None,
        "delta_bias": rnd(dim, scale=0.2).abs() if with_bias else None,
    }
    for t in x.values():
        if t is not None:
            t.requires_grad_()
    return x


def grads(y, x, gy):
    names = [k for k, v in x.items() if v is not None]
    return dict(zip(names, torch.autograd.grad(y, [x[k] for k in names], gy)))


def _cpp(*args, **kwargs):
    if not scan_cpu.available():
        pytest.skip("compiled CPU selective scan unavailable (no C++ compiler / ninja, or the build failed)")
    return scan_cpu.selective_scan_cpu(*args, **kwargs)


# The implementations a CPU can run; "torch_gpu" is the GPU blocking run on CPU tensors.
IMPLS = {"torch_cpu": selective_scan_torch, "torch_gpu": BACKENDS["torch_gpu"], "cpp": _cpp,
         "export": BACKENDS["export"]}

OPTIONS = [  # (with_d, with_z, with_bias, delta_softplus)
    (True, True, True, True),
    (False, False, False, False),
    (True, False, False, True),
    (False, True, True, False),
    (False, False, True, True),
]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bc", ["var", "const", "grouped"])
@pytest.mark.parametrize("options", OPTIONS)
def test_scan_matches_reference(impl, dtype, bc, options):
    with_d, with_z, with_bias, softplus = options
    x = make_scan_inputs(bc, dtype, with_d, with_z, with_bias)
    y, last = IMPLS[impl](**x, delta_softplus=softplus, return_last_state=True)
    y_ref, last_ref = selective_scan_reference(**x, delta_softplus=softplus, return_last_state=True)
    assert y.shape == y_ref.shape == x["u"].shape and y.dtype == dtype
    assert last.shape == (3, 6, 4)
    assert close(y, y_ref, dtype)
    assert close(last, last_ref, dtype)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    g, g_ref = grads(y, x, gy), grads(y_ref, x, gy)
    assert g.keys() == g_ref.keys()
    for name in g:
        assert g[name].shape == x[name].shape, name
        assert close(g[name], g_ref[name], dtype), name


@pytest.mark.parametrize("bc", ["var", "const"])
@pytest.mark.parametrize("block_b,block_l", [(1, 1), (2, 3), (2, 4), (5, 11), (1, 100)])
def test_torch_scan_blocking_is_exact(bc, block_b, block_l):
    """Any batch/time blocking (incl. state carried across time chunks) gives the same result."""
    x = make_scan_inputs(bc, torch.float64)
    y, last = selective_scan_torch(
        **x, delta_softplus=True, return_last_state=True, block_b=block_b, block_l=block_l
    )
    y_ref, last_ref = selective_scan_reference(**x, delta_softplus=True, return_last_state=True)
    assert max_err(y, y_ref) <= 1e-10 and max_err(last, last_ref) <= 1e-10
    gy = torch.randn(y.shape, dtype=torch.float64)
    g, g_ref = grads(y, x, gy), grads(y_ref, x, gy)
    for name in g:
        assert max_err(g[name], g_ref[name]) <= 1e-10, name


def test_gpu_blocking_takes_whole_batch_steps():
    assert gpu_blocks(2048, 256, 51, 16) == (2048, 16)  # 2^27 elements per scratch tensor
    assert gpu_blocks(8, 256, 51, 16) == (8, 51)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_scan_default_return_and_no_grad(impl):
    x = make_scan_inputs("var", torch.float32)
    with torch.no_grad():
        y = IMPLS[impl](**x, delta_softplus=True)
    assert isinstance(y, torch.Tensor) and not y.requires_grad
    assert max_err(y, selective_scan_reference(**x, delta_softplus=True)) <= 1e-5


@pytest.mark.parametrize("impl", list(IMPLS))
def test_scan_half_inputs_compute_in_float32(impl):
    x = make_scan_inputs("var", torch.float32, with_bias=False)
    xb = {k: (v.detach().to(torch.bfloat16) if v is not None else None) for k, v in x.items()}
    y, last = IMPLS[impl](**xb, delta_softplus=True, return_last_state=True)
    y_ref = selective_scan_reference(**xb, delta_softplus=True)
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2)  # bf16 ulps


@pytest.mark.parametrize("bc", ["const", "grouped"])
def test_torch_scan_accumulates_in_float32_under_bf16_autocast(monkeypatch, bc):
    """The GPU scan's contractions (``torch.mv`` forward, ``torch.matmul`` backward) are on autocast's
    lower-precision lists (``mv`` on CUDA's): autocast must be off around them. Checked on CPU autocast,
    which runs the same code: every contraction sees autocast off and float32 operands, and forward and
    backward (called inside the autocast block) equal the float32 run."""
    seen = []
    for name in ("mv", "matmul"):
        real = getattr(torch, name)

        def spy(*args, _real=real, **kwargs):
            seen.append((torch.is_autocast_enabled("cpu"), {a.dtype for a in args if isinstance(a, torch.Tensor)}))
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    x = make_scan_inputs(bc, torch.float32)
    gy = torch.randn(3, 6, 11, generator=torch.Generator().manual_seed(1))
    scan = BACKENDS["torch_gpu"]
    y32 = scan(**x, delta_softplus=True)
    g32 = grads(y32, x, gy)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = scan(**x, delta_softplus=True)
        g = grads(y, x, gy)
    assert seen and all(not enabled and dtypes == {torch.float32} for enabled, dtypes in seen), seen
    assert y.dtype == torch.float32 and max_err(y, y32) == 0
    assert all(max_err(g[k], g32[k]) == 0 for k in g32)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_scan_large_steps_stay_finite(impl):
    """Large step sizes (dt A << 0) only ever exponentiate non-positive numbers."""
    x = make_scan_inputs("var", torch.float32, with_z=False)
    with torch.no_grad():
        x["delta"].mul_(0).add_(50.0)  # dt = softplus(50 + bias) ~ 50: exp(dt A) underflows
    y = IMPLS[impl](**x, delta_softplus=True)
    y_ref = selective_scan_reference(**x, delta_softplus=True)
    assert torch.isfinite(y).all()
    assert max_err(y, y_ref) <= 1e-5 * max(1.0, y_ref.abs().max().item())
    g = grads(y, x, torch.ones_like(y))
    assert all(torch.isfinite(v).all() for v in g.values())


@pytest.mark.parametrize("impl", ["torch_cpu", "cpp"])
def test_scan_keeps_no_state_sized_tensors_for_backward(impl):
    """Memory: nothing of size batch x dim x length x d_state is saved (states recomputed)."""
    x = make_scan_inputs("var", torch.float32, batch=8, dim=16, length=20, d_state=16)
    inputs = {t.untyped_storage().data_ptr() for t in x.values() if t is not None}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        IMPLS[impl](**x, delta_softplus=True)
    state_bytes = 8 * 16 * 20 * 16 * 4
    assert sum(saved.values()) <= state_bytes / 8  # at most the (batch, dim, length) pre-gate y


def test_reference_against_hand_computed_recurrence():
    """Ground truth for the ground truth: one channel, one state, two steps, by hand."""
    u = torch.tensor([[[2.0, -1.0]]], dtype=torch.float64)
    delta = torch.tensor([[[0.5, 0.25]]], dtype=torch.float64)
    A = torch.tensor([[-1.5]], dtype=torch.float64)
    B = torch.tensor([[[0.7, -0.3]]], dtype=torch.float64)  # (batch, N, L)
    C = torch.tensor([[[1.1, 0.9]]], dtype=torch.float64)
    D = torch.tensor([0.2], dtype=torch.float64)
    z = torch.tensor([[[0.4, -2.0]]], dtype=torch.float64)
    h0 = 0.5 * 0.7 * 2.0
    h1 = math.exp(0.25 * -1.5) * h0 + 0.25 * -0.3 * -1.0
    silu = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    expected = [(1.1 * h0 + 0.2 * 2.0) * silu(0.4), (0.9 * h1 + 0.2 * -1.0) * silu(-2.0)]
    for fn in (selective_scan_reference, *IMPLS.values()):
        y, last = fn(u, delta, A, B, C, D, z, return_last_state=True)
        torch.testing.assert_close(y.flatten(), torch.tensor(expected, dtype=torch.float64))
        torch.testing.assert_close(last.flatten(), torch.tensor([h1], dtype=torch.float64))


def test_scan_rejects_bad_shapes():
    x = make_scan_inputs("var", torch.float32)
    with pytest.raises(ValueError, match="B"):
        selective_scan_fn(**{**x, "B": x["B"][:, :, :-1]})
    with pytest.raises(ValueError, match="A"):
        selective_scan_fn(**{**x, "A": x["A"][:-1]})
    with pytest.raises(ValueError, match="positions"):
        selective_scan_fn(**x, positions=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="z"):  # with positions, z is the gate there: (batch, dim)
        selective_scan_fn(**x, positions=torch.zeros(3, dtype=torch.long))


# ------------------------------------------------------------------ read at one position per row


@pytest.mark.parametrize("backend", ["reference", "torch_cpu", "torch_gpu", "cpp", "export"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_z", [True, False])
def test_positions_read_out_matches_reference(monkeypatch, backend, dtype, with_z):
    """y[b, :, p_b] with the gate at p_b only: values and all gradients equal the full scan's."""
    if backend == "cpp" and not scan_cpu.available():
        pytest.skip("compiled CPU selective scan unavailable")
    monkeypatch.setattr(selective_scan, "scan_backend", lambda u: backend)
    x = make_scan_inputs("var", dtype, with_z=False, seed=3)
    positions = torch.tensor([10, 0, 6])
    z_full = torch.randn(3, 6, 11, dtype=dtype)
    z_at = z_full[torch.arange(3), :, positions].clone().requires_grad_() if with_z else None
    y = selective_scan_fn(**{**x, "z": z_at}, delta_softplus=True, positions=positions)
    y_full = selective_scan_reference(**x, delta_softplus=True)
    y_ref = y_full[torch.arange(3), :, positions]
    if with_z:
        y_ref = y_ref * F.silu(z_at)
    assert y.shape == (3, 6) and close(y, y_ref, dtype)
    inputs = {**x, "z": z_at}
    gy = torch.randn(3, 6, dtype=dtype)
    g, g_ref = grads(y, inputs, gy), grads(y_ref, inputs, gy)
    for name in g:
        assert close(g[name], g_ref[name], dtype), name
    # nothing after a row's position influences its output
    assert g["u"][1, :, 1:].abs().max() == 0 and g["delta"][2, :, 7:].abs().max() == 0


def test_positions_exclude_return_last_state():
    x = make_scan_inputs("var", torch.float32, with_z=False)
    with pytest.raises(ValueError, match="exclusive"):
        selective_scan_fn(**x, return_last_state=True, positions=torch.zeros(3, dtype=torch.long))


# -------------------------------------------------------------------------- compiled operator


@needs_cpp
def test_cpp_op_is_one_custom_op_with_fake_kernel_and_autograd():
    x = make_scan_inputs("grouped", torch.float32)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, None)
    torch.library.opcheck(torch.ops.mdaf_rec.selective_scan_fwd.default, args)
    positions = torch.tensor([4, 10, 0])
    z_at = torch.randn(3, 6, requires_grad=True)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], z_at, x["delta_bias"], True,
            positions)
    torch.library.opcheck(torch.ops.mdaf_rec.selective_scan_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@needs_cpp
def test_cpp_op_threads_split_the_batch():
    """2 threads split the batch rows; per-thread partial sums of dA, dD are added in order."""
    x = make_scan_inputs("var", torch.float32, batch=7, seed=5)
    gy = torch.randn(7, 6, 11)
    y1 = scan_cpu.selective_scan_cpu(**x, delta_softplus=True)
    g1 = grads(y1, x, gy)
    torch.set_num_threads(2)
    y2 = scan_cpu.selective_scan_cpu(**x, delta_softplus=True)
    g2 = grads(y2, x, gy)
    assert max_err(y1, y2) == 0
    for name in g1:
        assert max_err(g1[name], g2[name]) <= 1e-6 * max(1.0, g1[name].abs().max().item()), name


@needs_cpp
def test_cpp_op_rejects_positions_out_of_range():
    x = make_scan_inputs("var", torch.float32, with_z=False)
    with pytest.raises(RuntimeError, match="positions"):
        scan_cpu.selective_scan_cpu(**x, positions=torch.tensor([0, 11, 2]))


def test_failed_build_falls_back_with_one_line_warning(monkeypatch, caplog):
    def no_compiler():
        raise RuntimeError("Error building extension 'x': c++: not found\nmore detail")

    monkeypatch.setattr(scan_cpu, "_build_and_load", no_compiler)
    monkeypatch.setattr(scan_cpu, "ops_registered", lambda: False)  # as in a fresh process
    monkeypatch.setattr(scan_cpu, "_loaded", None)
    with caplog.at_level(logging.WARNING, logger="mdaf_rec.ops.scan_cpu"):
        assert scan_cpu.available() is False
        assert scan_cpu.available() is False  # tried once per process
        x = make_scan_inputs("var", torch.float32)
        y = selective_scan_fn(**x, delta_softplus=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "c++: not found" in warnings[0].getMessage()
    assert max_err(y, selective_scan_reference(**x, delta_softplus=True)) <= 1e-5


# -------------------------------------------------------------------------------- dispatcher


def test_dispatcher_choices(monkeypatch):
    cpu = torch.zeros(1)
    cuda = types.SimpleNamespace(device=torch.device("cuda"))  # no CUDA needed to name one
    monkeypatch.setattr(scan_cpu, "available", lambda: True)
    assert scan_backend(cpu) == "cpp"
    monkeypatch.setattr(scan_cpu, "available", lambda: False)
    assert scan_backend(cpu) == "torch_cpu"
    monkeypatch.setattr(selective_scan, "mamba_ssm_selective_scan_fn", None)
    assert scan_backend(cuda) == "torch_gpu"
    monkeypatch.setattr(selective_scan, "mamba_ssm_selective_scan_fn", lambda *a, **k: None)
    assert scan_backend(cuda) == "mamba_ssm"
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert scan_backend(cpu) == "export" and scan_backend(cuda) == "export"


def test_dispatcher_calls_mamba_ssm_with_its_signature(monkeypatch):
    calls = []

    def fake_mamba_ssm(*args, **kwargs):
        calls.append((len(args), kwargs))
        return selective_scan_reference(*args, **kwargs)

    monkeypatch.setattr(selective_scan, "mamba_ssm_selective_scan_fn", fake_mamba_ssm)
    monkeypatch.setattr(selective_scan, "scan_backend", lambda u: "mamba_ssm")
    x = make_scan_inputs("var", torch.float64)
    y = selective_scan_fn(**x, delta_softplus=True)
    assert calls == [(10, {})]
    assert max_err(y, selective_scan_reference(**x, delta_softplus=True)) == 0


class _ScanModule(torch.nn.Module):
    def forward(self, u, delta, A, B, C, D, z, delta_bias, positions):
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True,
                                 positions=positions)


@pytest.mark.parametrize("read_at", [False, True])
def test_export_traces_plain_ops_with_a_dynamic_batch(read_at):
    """The exported program holds only aten ops (loads with torch alone) and keeps the batch
    dynamic; it equals the float64 reference at another batch size."""

    def inputs(batch, seed):
        x = {k: v.detach() for k, v in make_scan_inputs("var", torch.float64, batch=batch,
                                                          seed=seed).items()}
        x["positions"] = torch.arange(batch) % 11 if read_at else None
        if read_at:
            x["z"] = x["z"][:, :, 0].contiguous()
        return x

    x = inputs(3, 0)
    batch = torch.export.Dim("batch", min=1)
    shapes = {"u": {0: batch}, "delta": {0: batch}, "A": None, "B": {0: batch}, "C": {0: batch},
              "D": None, "z": {0: batch}, "delta_bias": None,
              "positions": {0: batch} if read_at else None}
    program = torch.export.export(_ScanModule(), (), x, dynamic_shapes=shapes)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("mdaf_rec" in t for t in targets), targets
    x5 = inputs(5, 2)
    y = program.module()(**x5)
    positions = x5.pop("positions")
    if read_at:
        y_ref = selective_scan_reference(**{**x5, "z": None}, delta_softplus=True)
        y_ref = y_ref[torch.arange(5), :, positions] * F.silu(x5["z"])
    else:
        y_ref = selective_scan_reference(**x5, delta_softplus=True)
    assert y.shape == y_ref.shape and max_err(y, y_ref) <= 1e-12


@needs_cpp
def test_torch_compile_sees_one_op():
    """Under torch.compile (not export) the CPU scan stays the compiled custom op."""
    x = make_scan_inputs("var", torch.float32)
    compiled = torch.compile(lambda **k: selective_scan_fn(**k, delta_softplus=True),
                             backend="aot_eager", fullgraph=True)
    y = compiled(**x)
    y_ref = selective_scan_reference(**x, delta_softplus=True)
    assert close(y, y_ref, torch.float32)
    g, g_ref = grads(y, x, torch.ones_like(y)), grads(y_ref, x, torch.ones_like(y))
    for name in g:
        assert close(g[name], g_ref[name], torch.float32), name


@needs_cpp
def test_build_holds_a_process_lock_and_clears_a_stale_baton(monkeypatch, tmp_path):
    """Concurrent builders (torchrun) serialise on an flock of the cache folder; a lock file left
    by a killed build (cpp_extension's baton, which would make every later build wait forever) is
    removed under that flock."""
    import fcntl

    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = scan_cpu.build_directory()
    assert folder.parent == tmp_path
    folder.mkdir()
    (folder / "lock").touch()
    seen = {}

    def fake_load(name, sources, build_directory, **kwargs):
        seen["baton"] = (Path(build_directory) / "lock").exists()
        with open(Path(build_directory) / "build.flock") as other:  # a second process's attempt
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen["locked"] = False
            except BlockingIOError:
                seen["locked"] = True

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    scan_cpu._build_and_load()
    assert seen == {"baton": False, "locked": True}


# ------------------------------------------------------------------ causal conv1d + SiLU


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("channel_last", [True, False])
def test_causal_conv1d_silu_matches_conv1d(dtype, with_bias, channel_last):
    """The compiled operator equals F.silu(F.conv1d(...)[..., :L]) in value and all gradients,
    for a time-contiguous input and for Mamba's transposed view of in_proj's output."""
    if not scan_cpu.available():
        pytest.skip("compiled CPU kernels unavailable")
    g = torch.Generator().manual_seed(0)
    dim, length = 19, 7  # one full 16-channel block (8 for float64) and a partial one
    base = torch.randn(3, length, dim, generator=g, dtype=dtype)
    x = (base.transpose(1, 2) if channel_last else base.transpose(1, 2).contiguous()).requires_grad_()
    weight = torch.randn(dim, 1, 4, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(dim, generator=g, dtype=dtype, requires_grad=True) if with_bias else None
    y = causal_conv1d_silu(x, weight, bias)
    y_ref = F.silu(F.conv1d(x, weight, bias, padding=3, groups=dim)[..., :length])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.ops.mdaf_rec.causal_conv1d_silu_fwd.default in _ops_called(causal_conv1d_silu, x, weight, bias)
    assert max_err(y, y_ref) <= tol
    inputs = [t for t in (x, weight, bias) if t is not None]
    gy = torch.randn(y.shape, generator=g, dtype=dtype)
    for a, b in zip(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(y_ref, inputs, gy)):
        assert a.shape == b.shape and max_err(a, b) <= tol * max(1.0, b.abs().max().item())


def _ops_called(fn, *args):
    """The aten / custom ops ``fn(*args)`` dispatches (recorded with TorchDispatchMode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func)
            return func(*args, **(kwargs or {}))

    with Record() as record:
        fn(*args)
    return record.ops


@needs_cpp
def test_causal_conv1d_op_check():
    x = torch.randn(2, 5, 6).transpose(1, 2).requires_grad_()  # (2, 6, 5), channel-contiguous
    weight = torch.randn(6, 4, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    causal_conv1d_silu(x, weight[:, None], bias)  # registers the Python parts
    torch.library.opcheck(torch.ops.mdaf_rec.causal_conv1d_silu_fwd.default, (x, weight, bias))
    torch.library.opcheck(torch.ops.mdaf_rec.causal_conv1d_silu_fwd.default, (x, weight, None))


def test_causal_conv1d_falls_back_to_conv1d_under_export():
    x, weight, bias = torch.randn(2, 6, 5), torch.randn(6, 1, 4), torch.randn(6)

    class Conv(torch.nn.Module):
        def forward(self, x):
            return causal_conv1d_silu(x, weight, bias)

    program = torch.export.export(Conv(), (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("mdaf_rec" in t for t in targets) and any("conv" in t for t in targets), targets
    torch.testing.assert_close(program.module()(x), F.silu(F.conv1d(x, weight, bias, padding=3, groups=6)[..., :5]))


@needs_cpp
@pytest.mark.parametrize("read_at", [False, True])
def test_cpp_op_reads_and_writes_any_strides(read_at):
    """Channel-contiguous views (Mamba's transposed projections) give the values and gradients
    of contiguous inputs; outputs keep the inputs' dimension order (no copies)."""
    x = make_scan_inputs("var", torch.float32, batch=3, dim=20, length=9, seed=7)
    views = {k: (x[k].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
                 if k in ("u", "delta", "z") else x[k]) for k in x}
    positions = torch.tensor([8, 3, 0]) if read_at else None
    if read_at:
        for inputs in (x, views):
            inputs["z"] = inputs["z"].detach()[:, :, 0].requires_grad_()
    assert views["u"].stride() == (180, 1, 20)
    y = scan_cpu.selective_scan_cpu(**x, delta_softplus=True, positions=positions)
    y_v = scan_cpu.selective_scan_cpu(**views, delta_softplus=True, positions=positions)
    assert max_err(y_v, y) == 0 and (read_at or y_v.stride() == (180, 1, 20))
    gy = torch.randn(y.shape)
    g, g_v = grads(y, x, gy), grads(y_v, views, gy)
    for name in g:
        assert max_err(g_v[name], g[name]) <= 1e-6 * max(1.0, g[name].abs().max().item()), name
