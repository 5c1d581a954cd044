"""The helpers under the engine: devices, threads, the erf kernel, last-axis sums, and the profiler on the op hooks."""

import math
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from scipy.special import erf as exact_erf

from minivit import allocator, devices, nn, optim, parallel
from minivit.kernels import erf
from minivit.ops.reduce import sum_last
from minivit.profile import Profiler, profile_step


def test_float32_erf_is_within_4e7_of_the_exact_value_everywhere():
    x = np.linspace(-8, 8, 2_000_001, dtype=np.float32)
    y = erf(x)
    assert y.dtype == np.float32
    assert np.abs(y.astype(np.float64) - exact_erf(x.astype(np.float64))).max() < 4e-7
    np.testing.assert_array_equal(erf(-x), -y)  # odd


def test_float64_erf_is_exact():
    x = np.linspace(-6, 6, 10001)
    np.testing.assert_array_equal(erf(x), exact_erf(x))


def test_sum_last_matches_sum():
    x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(sum_last(x), x.sum(-1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(sum_last(x, keepdims=False), x.sum(-1), rtol=1e-6)


def test_devices():
    a = np.zeros(3)
    assert devices.device_of(a) == "cpu" and devices.get_array_module(a) is np
    assert devices.to_device(a, "cpu") is a
    assert devices.normalize_device("cuda:0") == "cuda"
    if not devices.cuda_available():
        with pytest.raises(RuntimeError, match="CuPy"):
            devices.to_device(a, "cuda")


FAULTS = """
import resource, numpy as np
import minivit
from minivit import allocator
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        arrays = [np.ones(1_000_000, np.float32) for _ in range(10)]   # 10 x 4 MB alive at once, then freed
        del arrays
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
tuned, first = allocator.is_tuned(), faults()
allocator.restore_malloc()
print(tuned, first, allocator.is_tuned(), faults())
"""


def _fault_counts(env):
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1]), out[2] == "True", int(out[3])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator setting is glibc's")
def test_import_keeps_freed_memory_for_reuse_and_restore_malloc_undoes_it():
    # 10 arrays of 4 MB freed and made again 10 times: with the setting no page is faulted in anew
    tuned, faults, still_tuned, restored_faults = _fault_counts({})
    assert tuned and not still_tuned
    assert faults < 1000, faults
    assert restored_faults > 10 * 1000, restored_faults   # the memory went back to the system each round
    tuned, faults, _, _ = _fault_counts({"MINIVIT_TUNE_MALLOC": "0"})
    assert not tuned and faults > 10 * 1000


def test_default_threads_use_every_core_shared_among_local_ranks(monkeypatch):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.delenv("MINIVIT_NUM_THREADS", raising=False)
    monkeypatch.delenv("MPI_LOCALNRANKS", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE", raising=False)
    assert parallel.default_num_threads() == cores
    monkeypatch.setenv("MPI_LOCALNRANKS", str(2 * cores))
    assert parallel.default_num_threads() == 1
    monkeypatch.setenv("MINIVIT_NUM_THREADS", "3")
    assert parallel.default_num_threads() == 3
    out = subprocess.run([sys.executable, "-c", "import minivit; print(minivit.get_num_threads())"],
                         capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k not in ("MINIVIT_NUM_THREADS",
                                                                              "MPI_LOCALNRANKS")}).stdout
    assert int(out) == cores


def test_numpy_blas_is_on_one_thread_inside_a_parallel_section_and_restored_after(two_threads):
    blas = parallel._numpy_blas()
    if blas is None:
        pytest.skip("no controllable BLAS under NumPy")
    blas.set_num_threads(2)
    seen = parallel.parallel_rows(4, lambda rows: blas.get_num_threads())
    assert seen == [1, 1]
    assert blas.get_num_threads() == 2
    with pytest.raises(ZeroDivisionError):
        parallel.parallel_rows(4, lambda rows: 1 / 0)
    assert blas.get_num_threads() == 2   # restored when a section fails too


def test_profiler_times_every_op_forward_and_backward():
    model = nn.VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=2,
                                 num_heads=2)
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    opt = optim.SGD(model.parameters(), lr=0.1)
    prof = profile_step(model, x, np.array([0, 1, 2, 0]), opt, steps=2)
    names = {name for name, _ in prof.stats}
    assert {"LinearFn", "LayerNormFn", "MultiHeadSelfAttentionFn", "GELUFn", "CrossEntropyFn",
            "optimizer.step"} <= names
    calls = {key: c for key, (c, _) in prof.stats.items()}
    assert calls[("LinearFn", "forward")] == 2 * (4 * 2 + 1 + 1)  # 4 per block, patch embedding, head
    assert calls[("LayerNormFn", "backward")] == 2 * 5
    phases = prof.by_phase()
    assert phases["forward"] > 0 and phases["backward"] > 0
    assert sum(phases.values()) <= prof.wall / 2 * 1.01
    table = prof.table()
    assert "LinearFn" in table and "share" in table
    with pytest.raises(RuntimeError, match="already active"):
        with Profiler():
            with Profiler():
                pass


@pytest.fixture
def two_threads():
    parallel.set_num_threads(2)
    yield
    parallel.set_num_threads(1)


def test_threaded_ops_pass_the_gradient_check(two_threads):
    from minivit import functional as F
    from minivit.gradcheck import gradcheck
    rng = np.random.default_rng(0)
    cases = {
        "linear": (lambda x, w, b: F.linear(x, w, b), [rng.standard_normal((5, 3, 4)), rng.standard_normal((6, 4)),
                                                      rng.standard_normal(6)]),
        "layer_norm": (lambda x, w, b: F.layer_norm(x, w, b), [rng.standard_normal((3, 4, 5)), rng.standard_normal(5),
                                                              rng.standard_normal(5)]),
        "gelu": (lambda x: F.gelu(x), [rng.standard_normal((3, 7))]),
        "attention": (lambda qkv: F.multi_head_self_attention(qkv, 2), [rng.standard_normal((3, 4, 12))]),
    }
    assert parallel.get_num_threads() == 2
    for name, (fn, inputs) in cases.items():
        report = gradcheck(fn, inputs)
        assert report.ok, f"{name}\n{report}"


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("block", [None, 1, 3, 100])
def test_parallel_rows_visits_every_row_once_in_order(threads, block):
    parallel.set_num_threads(threads)
    try:
        parts = parallel.parallel_rows(10, lambda r: (r.start, r.stop), block=block)
        assert parallel.parallel_rows(0, lambda r: (r.start, r.stop), block=block) == [(0, 0)]
    finally:
        parallel.set_num_threads(1)
    assert [i for lo, hi in parts for i in range(lo, hi)] == list(range(10))
    assert len(parts) >= threads
    if block is not None:
        assert all(hi - lo <= block for lo, hi in parts)


def test_gelu_in_blocks_smaller_than_a_threads_share_passes_the_gradient_check(two_threads, monkeypatch):
    from minivit import functional as F
    from minivit.gradcheck import gradcheck
    from minivit.ops.activation import GELUFn
    monkeypatch.setattr(GELUFn, "BLOCK", 4)
    x = np.random.default_rng(0).standard_normal((3, 7))
    report = gradcheck(lambda x: F.gelu(x), [x])
    assert report.ok, str(report)
    exact = x * 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    np.testing.assert_allclose(F.gelu(x).data, exact, rtol=1e-13)


def test_threads_change_no_result_beyond_rounding(two_threads):
    from minivit import functional as F
    model = nn.VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=16, depth=2,
                                 num_heads=2)
    x = np.random.default_rng(0).standard_normal((6, 1, 16, 16)).astype(np.float32)
    y = np.arange(6) % 5

    def run():
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.item(), [p.grad.copy() for p in model.parameters()]
    loss2, grads2 = run()
    parallel.set_num_threads(1)
    loss1, grads1 = run()
    assert abs(loss1 - loss2) < 1e-6
    for a, b in zip(grads1, grads2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------- float16 storage on the CPU
def _ulps(a, reference):
    """|a - reference| in units of the float16 spacing at reference (both float16 arrays)."""
    spacing = np.spacing(np.abs(reference)).astype(np.float64)
    return np.abs(a.astype(np.float64) - reference.astype(np.float64)) / spacing


@pytest.mark.parametrize("shape_a, shape_b", [((37, 50), (50, 23)), ((3, 9, 16), (16, 5)), ((2, 7, 12), (2, 12, 4))])
def test_float16_matmul_gives_numpys_own_float16_product(shape_a, shape_b, two_threads):
    # NumPy's float16 loop accumulates in float32 and rounds each output once; kernels.matmul does the same
    # through BLAS, so the two differ at most by the order of the float32 sums: a float16 ulp at the very most.
    from minivit.kernels import matmul
    rng = np.random.default_rng(0)
    a = rng.standard_normal(shape_a).astype(np.float16)
    b = rng.standard_normal(shape_b).astype(np.float16)
    ours, numpys = matmul(a, b), np.matmul(a, b)
    assert ours.dtype == np.float16 and ours.shape == numpys.shape
    assert _ulps(ours, numpys).max() <= 1
    out = np.empty_like(numpys)
    assert matmul(a, b, out=out) is out and np.array_equal(out, ours)
    # float32 and mixed operands are NumPy's product unchanged
    assert np.array_equal(matmul(a.astype(np.float32), b.astype(np.float32)),
                          a.astype(np.float32) @ b.astype(np.float32))


def test_astype_over_threads_is_numpys_conversion_bit_for_bit(two_threads):
    from minivit.kernels import astype
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((300, 700)) * 1e3).astype(np.float32)   # 210,000 values: several blocks per thread
    x[0, :4] = [np.inf, -np.inf, 7e4, 1e-9]                          # overflow to inf, underflow to 0
    with np.errstate(over="ignore"):                                 # 7e4 overflows float16, as in NumPy
        half, numpys = astype(x, np.float16), x.astype(np.float16)
        transposed, numpys_transposed = astype(x.T, np.float16), x.T.astype(np.float16)
    assert half.dtype == np.float16 and half.shape == x.shape
    assert np.array_equal(half, numpys) and np.isinf(half[0, :3]).all() and half[0, 3] == 0
    assert np.array_equal(astype(half, np.float32), half.astype(np.float32))
    assert np.array_equal(transposed, numpys_transposed)                # a transposed view


def test_float16_gelu_is_the_exact_value_rounded_once_and_its_gradient_within_one_ulp(two_threads):
    from minivit import Tensor
    from minivit import functional as F
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(200_000) * 4).astype(np.float16)
    x[:3] = [-5.0, 0.0, 3.0]
    t = Tensor(x, requires_grad=True)
    y = F.gelu(t)
    x64 = x.astype(np.float64)
    cdf = 0.5 * (1 + exact_erf(x64 / math.sqrt(2)))
    exact = (x64 * cdf).astype(np.float16)
    assert y.data.dtype == np.float16
    assert _ulps(y.data, exact).max() <= 1
    dy = rng.standard_normal(x.shape).astype(np.float16)
    y.backward(dy)
    exact_dx = (dy * (cdf + x64 * np.exp(-x64 * x64 / 2) / math.sqrt(2 * math.pi))).astype(np.float16)
    assert t.grad.dtype == np.float16
    assert _ulps(t.grad, exact_dx).max() <= 1


def test_float16_linear_gradients_are_rounded_once_however_many_threads(two_threads):
    # dW and db sum over all rows; the threads' shares stay float32 until they are added, so the result is the
    # exact product rounded once to float16, not a sum of shares each rounded (which differs in many entries).
    from minivit import Tensor
    from minivit import functional as F
    rng = np.random.default_rng(3)
    x = rng.standard_normal((512, 48)).astype(np.float16)
    w = Tensor(rng.standard_normal((40, 48)).astype(np.float16), requires_grad=True)
    b = Tensor(rng.standard_normal(40).astype(np.float16), requires_grad=True)
    dy = rng.standard_normal((512, 40)).astype(np.float16)
    F.linear(Tensor(x), w, b).backward(dy)
    once_w = (dy.astype(np.float64).T @ x.astype(np.float64)).astype(np.float16)
    once_b = dy.astype(np.float64).sum(axis=0).astype(np.float16)
    for grad, once in ((w.grad, once_w), (b.grad, once_b)):
        assert grad.dtype == np.float16
        assert np.mean(grad == once) >= 0.99        # float32 sums may land on the other side of a tie, rarely
        assert _ulps(grad, once).max() <= 1
