import pytest
import torch

from fxlrd.decompose import leading_svd, svd_factors, tucker2_factors, unfold


def _tucker_rebuild(t, weight):
    core = t.core.double()
    if t.out_factor is not None:
        core = torch.einsum("sr,r...->s...", t.out_factor.double(), core)
    if t.in_factor is not None:
        core = torch.einsum("cq,sq...->sc...", t.in_factor.double(), core)
    return core


def _hosvd_truncation(weight, r1, r2):
    """Plain HOSVD truncation computed independently with torch.linalg.svd."""
    w = weight.double()
    u_out = torch.linalg.svd(unfold(w, 0), full_matrices=False)[0][:, :r2]
    u_in = torch.linalg.svd(unfold(w, 1), full_matrices=False)[0][:, :r1]
    core = torch.einsum("sc...,sr,cq->rq...", w, u_out, u_in)
    return torch.einsum("rq...,sr,cq->sc...", core, u_out, u_in)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(40, 70), (90, 30), (64, 64)])
@pytest.mark.parametrize("rank", [1, 7, 29])
def test_truncated_svd_error_is_the_eckart_young_bound(shape, rank, dtype, tol):
    w = torch.randn(shape, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, shape[1], dtype=torch.float64))
    w = w.to(dtype)
    f = svd_factors(w, rank)
    assert f.in_factor.shape == (rank, shape[1]) and f.out_factor.shape == (shape[0], rank)
    err = torch.linalg.norm(w.double() - f.out_factor.double() @ f.in_factor.double()) / torch.linalg.norm(w.double())
    s = torch.linalg.svdvals(w.double())
    bound = torch.sqrt((s[rank:] ** 2).sum() / (s**2).sum())
    assert err.item() == pytest.approx(bound.item(), rel=tol * 100, abs=tol)


def test_svd_split_is_balanced():
    w = torch.randn(30, 50, dtype=torch.float64)
    f = svd_factors(w, 10)
    # √Σ on both sides: both factors carry the same singular values.
    torch.testing.assert_close(torch.linalg.svdvals(f.in_factor), torch.linalg.svdvals(f.out_factor))


def test_leading_svd_matches_torch_svd_on_tall_and_wide():
    for shape in [(20, 300), (300, 20)]:
        m = torch.randn(shape, dtype=torch.float64)
        u, s, vh = leading_svd(m.numpy(), 5)
        torch.testing.assert_close(torch.from_numpy(s), torch.linalg.svdvals(m)[:5])
        approx = torch.from_numpy(u * s) @ torch.from_numpy(vh)
        uu, ss, vv = torch.linalg.svd(m, full_matrices=False)
        torch.testing.assert_close(approx, (uu[:, :5] * ss[:5]) @ vv[:5])


@pytest.mark.parametrize("shape, ranks", [((32, 24, 3, 3), (10, 12)), ((16, 16, 5), (6, 6)), ((48, 8, 3, 3), (8, 20))])
def test_tucker_error_no_worse_than_hosvd_truncation(shape, ranks):
    w = torch.randn(shape)
    ref = _hosvd_truncation(w, *ranks)
    base = torch.linalg.norm(w.double() - ref)
    for iters in (0, 3):
        t = tucker2_factors(w, ranks, n_iter=iters)
        err = torch.linalg.norm(w.double() - _tucker_rebuild(t, w))
        assert err <= base * (1 + 1e-6), (iters, err, base)
    # With no HOOI iteration it is the HOSVD truncation itself.
    torch.testing.assert_close(_tucker_rebuild(tucker2_factors(w, ranks, 0), w), ref, rtol=1e-5, atol=1e-5)


def test_tucker_of_an_exact_low_multilinear_rank_tensor_is_exact():
    core = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    u_out, u_in = torch.randn(20, 5, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64)
    w = torch.einsum("rq...,sr,cq->sc...", core, u_out, u_in)
    t = tucker2_factors(w, (4, 5))
    assert t.core.shape == (5, 4, 3, 3) and t.in_factor.shape == (12, 4) and t.out_factor.shape == (20, 5)
    torch.testing.assert_close(_tucker_rebuild(t, w), w, rtol=1e-9, atol=1e-9)


def test_tucker_full_mode_keeps_no_factor():
    w = torch.randn(16, 3, 7, 7)
    t = tucker2_factors(w, (3, 8))
    assert t.in_factor is None and t.out_factor.shape == (16, 8) and t.core.shape == (8, 3, 7, 7)


def test_rank_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="outside"):
        svd_factors(torch.randn(4, 5), 0)
    with pytest.raises(ValueError, match="outside"):
        tucker2_factors(torch.randn(4, 5, 3, 3), (6, 2))


def test_tensorly_backend_of_the_user_is_left_alone():
    import tensorly

    before = tensorly.get_backend()
    tucker2_factors(torch.randn(8, 8, 3, 3), (4, 4))
    assert tensorly.get_backend() == before


def test_thread_map_keeps_order_grad_mode_and_the_callers_thread_count():
    import threading
    import time

    from fxlrd.decompose import thread_map

    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # (make test's workers run with a share of the cores: 1 here)
    seen = []

    def work(i):
        seen.append((threading.get_ident(), torch.is_grad_enabled(), torch.get_num_threads()))
        time.sleep(0.02)  # long enough that every worker gets items
        return i * i

    try:
        with torch.no_grad():
            assert thread_map(work, range(12)) == [i * i for i in range(12)]
        assert all(not grad for _, grad, _ in seen)
        assert torch.get_num_threads() == 2
        assert len({ident for ident, _, _ in seen}) > 1  # side by side, each worker single-threaded
        assert {threads for _, _, threads in seen} == {1}
    finally:
        torch.set_num_threads(previous)


def test_thread_map_max_workers_caps_the_threads():
    import threading
    import time

    from fxlrd.decompose import thread_map

    idents = set()

    def work(i):
        idents.add(threading.get_ident())
        time.sleep(0.01)
        return i

    assert thread_map(work, range(6), max_workers=1) == list(range(6))
    assert len(idents) == 1


def test_thread_map_raises_the_workers_exception_and_restores_threads():
    from fxlrd.decompose import thread_map

    before = torch.get_num_threads()

    def work(i):
        if i == 3:
            raise ValueError("layer 3 failed")
        return i

    with pytest.raises(ValueError, match="layer 3 failed"):
        thread_map(work, range(6))
    assert torch.get_num_threads() == before


def test_decompose_in_parallel_gives_the_serial_factors_and_keeps_tensorly_backend():
    import tensorly

    import fxlrd
    from fxlrd import zoo

    model = zoo.resnet50(num_classes=10).eval()  # svd (1x1, fc) and tucker2 (k x k) sites
    config = fxlrd.LRDConfig(ratio=2)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel = fxlrd.transform(model, config).state_dict()
        torch.set_num_threads(1)
        serial = fxlrd.transform(model, config).state_dict()
    finally:
        torch.set_num_threads(previous)
    assert parallel.keys() == serial.keys()
    for key in serial:
        torch.testing.assert_close(parallel[key], serial[key], rtol=1e-5, atol=1e-6, msg=key)
    assert tensorly.get_backend() == "numpy"


@pytest.mark.parametrize("seed", range(10))
def test_leading_svd_of_a_rank_deficient_tall_matrix_has_orthonormal_left_vectors(seed):
    """A 30x6 matrix of rank 5: the sixth left vector comes from a singular value that is
    rounding noise (sometimes exactly 0, sometimes ~1e-8 of the largest); it must still be a unit
    vector orthogonal to the others (Tucker's factors are orthonormal), and U s Vh the matrix."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(30, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 6, generator=g, dtype=torch.float64)
    u, s, vh = leading_svd(m.numpy(), 6)
    torch.testing.assert_close(torch.from_numpy(u.T @ u), torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-10)
    # (up to the noise singular value itself: its vectors are arbitrary)
    torch.testing.assert_close(torch.from_numpy((u * s) @ vh), m, rtol=0, atol=1e-6 * s[0])


def test_tucker_error_curve_is_each_modes_discarded_energy():
    """The Tucker-2 error curve at ``(r_in, r_out)`` is the HOSVD bound: the input unfolding's
    energy past r_in plus the output unfolding's past r_out, over the weight's energy; with one
    side whole it is the exact error of the Tucker-1 truncation, measured here independently."""
    from fxlrd.factorized import LayerSpec
    from fxlrd.methods import get_method

    g = torch.Generator().manual_seed(0)
    s, c = 6, 4
    w = torch.randn(s, c, 3, 3, generator=g, dtype=torch.float64)
    w = torch.einsum("sc...,s,c->sc...", w, torch.logspace(0, -1, s, dtype=torch.float64),
                     torch.logspace(0, -2, c, dtype=torch.float64))  # fmt: skip
    spec = LayerSpec("conv", c, s, (3, 3), 1, False, (1, 1), (1, 1), (1, 1))
    curve = get_method("tucker2").error_curve(w, spec)
    total = float((w**2).sum())

    def truncated(mode, r):  # project one mode onto its leading r singular vectors
        u = torch.linalg.svd(unfold(w, mode), full_matrices=False).U[:, :r]
        p = u @ u.T
        return torch.einsum("ts,sc...->tc...", p, w) if mode == 0 else torch.einsum("dc,sc...->sd...", p, w)

    for r_in in range(1, c + 1):
        exact = float(((w - truncated(1, r_in)) ** 2).sum()) / total
        assert curve((r_in, s)) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    for r_out in range(1, s + 1):
        exact = float(((w - truncated(0, r_out)) ** 2).sum()) / total
        assert curve((c, r_out)) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    sv_in, sv_out = torch.linalg.svdvals(unfold(w, 1)), torch.linalg.svdvals(unfold(w, 0))
    assert curve((2, 3)) == pytest.approx(float((sv_in[2:] ** 2).sum() + (sv_out[3:] ** 2).sum()) / total, rel=1e-9)
