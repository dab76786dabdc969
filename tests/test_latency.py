"""Timing backends and the disk cache of layer timings."""

import json
import multiprocessing as mp
import warnings

import pytest
import torch
from torch import nn

from fxlrd.latency import LatencyCache, LatencyConfig, OnnxRuntimeTimer, TorchTimer, make_timer, median_call_time


def test_median_call_time_is_positive_and_ordered():
    fast = median_call_time(lambda: sum(range(10)), repeats=5, warmup=1)
    slow = median_call_time(lambda: sum(range(100_000)), repeats=5, warmup=1)
    assert 0 < fast < slow


@pytest.mark.parametrize("timer_cls", [OnnxRuntimeTimer, TorchTimer])
def test_backends_time_a_layer(timer_cls):
    timer = timer_cls(LatencyConfig(repeats=3, warmup=1, threads=1))
    small = timer.time(nn.Conv2d(16, 16, 1), (1, 16, 8, 8))
    big = timer.time(nn.Conv2d(256, 256, 3, padding=1), (1, 256, 32, 32))
    assert 0 < small < big
    assert "threads=1" in timer.context


def test_search_times_a_copy_of_the_users_layer(tmp_path):
    from fxlrd.ranks.search import RankSearcher

    layer = nn.Conv2d(8, 8, 3).train()
    before = layer.weight.clone()
    searcher = RankSearcher(LatencyConfig(repeats=2, warmup=1, cache_path=tmp_path / "c.json", progress=False))
    assert searcher.time_layer(layer, (1, 8, 8, 8)) > 0
    assert layer.training and torch.equal(layer.weight, before)


def test_cache_hit_miss_and_persistence(tmp_path):
    path = tmp_path / "lat.json"
    cache = LatencyCache(path)
    calls = []
    assert cache.timed("k1", lambda: calls.append(1) or 0.5) == 0.5
    assert cache.timed("k1", lambda: calls.append(1) or 9.9) == 0.5
    assert calls == [1] and (cache.hits, cache.misses) == (1, 1)
    cache.flush()
    again = LatencyCache(path)
    assert again.get("k1") == 0.5 and again.get("k2") is None


def test_key_change_is_a_miss(tmp_path):
    from fxlrd.ranks.search import RankSearcher

    layer = nn.Conv2d(8, 8, 3)
    a = RankSearcher(LatencyConfig(threads=1, cache_path=tmp_path / "c.json", progress=False))
    b = RankSearcher(LatencyConfig(threads=2, cache_path=tmp_path / "c.json", progress=False))
    assert a._key(layer, (1, 8, 8, 8)) != b._key(layer, (1, 8, 8, 8))
    assert a._key(layer, (1, 8, 8, 8)) != a._key(layer, (2, 8, 8, 8))
    assert a._key(layer, (1, 8, 8, 8)) != a._key(nn.Conv2d(8, 8, 3, stride=2), (1, 8, 8, 8))


@pytest.mark.parametrize("content", ["{not json", '{"format": "other", "entries": {}}', '{"format": "fxlrd.latency-cache/1"}', "[]"])
def test_corrupt_cache_is_reported_and_rebuilt(tmp_path, content):
    path = tmp_path / "lat.json"
    path.write_text(content)
    with pytest.warns(UserWarning, match="unreadable.*rebuilding"):
        cache = LatencyCache(path)
    cache.put("k", 1.0)
    cache.flush()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LatencyCache(path).get("k") == 1.0
    assert json.loads(path.read_text())["format"] == "fxlrd.latency-cache/1"


def _writer(path, prefix, n):
    cache = LatencyCache(path)
    for i in range(n):
        cache.put(f"{prefix}{i}", float(i))
        cache.flush()


def test_two_writers_lose_nothing(tmp_path):
    path = tmp_path / "lat.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, p, 40)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = json.loads(path.read_text())["entries"]
    assert {f"{p}{i}" for p in "ab" for i in range(40)} <= set(entries)


@pytest.mark.slow
def test_compile_backend_times_an_inductor_compiled_layer():
    from fxlrd.latency import make_timer

    timer = make_timer(LatencyConfig(backend="compile", repeats=3, warmup=1, threads=1))
    assert timer.backend == "compile" and "torch=" in timer.context
    assert timer.time(nn.Conv2d(16, 16, 1), (1, 16, 8, 8)) > 0


@pytest.mark.slow
def test_cpu_compile_timer_freezes_the_weights_as_cpu_inference_does():
    """On the CPU the compile backend times what CPU inference deploys: inductor with freezing
    (weights folded in as constants). A frozen module keeps the weights it was compiled with;
    torch.compile's default reads them at every call."""
    x = torch.randn(4, 32)
    timer = TorchTimer(LatencyConfig(backend="compile", repeats=2, warmup=1, threads=1), compiled=True)
    default = TorchTimer(LatencyConfig(backend="compile", repeats=2, warmup=1, threads=1), compiled=True, freezing=False)
    assert timer.freezing and not default.freezing and timer.context == default.context + "|freezing"
    assert not TorchTimer(LatencyConfig(backend="eager"), compiled=True, device="meta").freezing  # off the CPU: the default
    for t, frozen in ((timer, True), (default, False)):
        torch._dynamo.reset()
        layer = nn.Linear(32, 16).eval()
        run = t._compile(layer, x)  # compiled by a first call
        with torch.no_grad():
            before = run(x)
            torch.testing.assert_close(before, layer(x))
            layer.weight.add_(1.0)
            after = run(x)
        assert torch.equal(after, before) == frozen
        if not frozen:
            torch.testing.assert_close(after, layer(x))


@pytest.mark.parametrize("method,spec,ranks,shape", [
    ("tucker2", ("conv", 32, 48, (3, 3), 1, True, (2, 2), (1, 1), (1, 1)), (16, 24), (1, 32, 14, 14)),
    ("svd", ("linear", 64, 32, (), 1, True), (16,), (2, 64)),
])  # fmt: skip
def test_layer_timing_exports_the_operators_deployment_exports(method, spec, ranks, shape, tmp_path):
    """Layers are timed through the fast TorchScript exporter; deployment uses the dynamo
    exporter. Both must give onnxruntime the same operators with the same attributes."""
    import onnx

    from fxlrd.export import export_onnx_file
    from fxlrd.factorized import LayerSpec, skeleton
    from fxlrd.latency import onnx_bytes

    module = skeleton(LayerSpec(*spec), method, ranks, device="cpu").eval()
    x = torch.randn(shape)
    export_onnx_file(module, ((x,), {}), tmp_path / "m.onnx", dynamic_batch=False)

    def ops(model):  # a bias-free MatMul by a constant is a Gemm to onnxruntime
        keep = {"kernel_shape", "strides", "pads", "dilations", "group"}
        return [("Gemm" if n.op_type == "MatMul" else n.op_type,
                 sorted((a.name, tuple(a.ints) or a.i) for a in n.attribute if a.name in keep))
                for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]  # fmt: skip

    fast, deployed = ops(onnx.load_from_string(onnx_bytes(module, x))), ops(onnx.load(str(tmp_path / "m.onnx")))
    assert fast == deployed and len(fast) == len(list(module.children()))


def test_torch_timer_times_in_the_deployment_dtype_on_a_copy():
    layer = nn.Linear(64, 48)
    seen = []
    layer.register_forward_pre_hook(lambda m, args: seen.append((m.weight.dtype, args[0].dtype)))  # copied with it
    timer = TorchTimer(LatencyConfig(backend="eager", dtype="bfloat16", repeats=2, warmup=1, threads=1))
    assert timer.time(layer, (4, 64)) > 0
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}  # what ran: weights and input cast
    run = timer.model_runner(layer, ((torch.randn(4, 64),), {}))
    seen.clear()
    run()
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert timer._cast(torch.arange(3)).dtype == torch.int64  # token ids are not
    assert layer.weight.dtype == torch.float32  # the caller's layer is not cast
    plain = TorchTimer(LatencyConfig(backend="eager", repeats=2, warmup=1, threads=1))
    assert timer.context != plain.context and timer.context.endswith("|bfloat16")  # separate cache entries


def test_latency_dtype_is_checked():
    from fxlrd.errors import ConfigError

    with pytest.raises(ConfigError, match="onnxruntime times the exported float32 model"):
        LatencyConfig(backend="onnxruntime", dtype="bfloat16")
    with pytest.raises(ConfigError, match="latency dtype must be one of"):
        LatencyConfig(backend="eager", dtype="int8")
    assert LatencyConfig(backend="onnxruntime", dtype="float32").dtype is None  # float32 is what it times anyway


def test_rank_search_in_bfloat16_keeps_float32_weights(tmp_path):
    import fxlrd
    from fxlrd import LRDConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    latency = LatencyConfig(backend="eager", dtype="bfloat16", repeats=2, warmup=1, threads=1,
                            cache_path=tmp_path / "c.json", progress=False)  # fmt: skip
    gm = fxlrd.transform(model, LRDConfig(ratio=2, latency=latency), example_inputs=torch.randn(2, 64))
    assert all(p.dtype == torch.float32 for p in gm.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any("|bfloat16|" in key for key in json.loads((tmp_path / "c.json").read_text())["entries"])


@pytest.mark.parametrize("where", ["under_a_file", "a_directory"])
def test_an_unusable_cache_path_warns_and_the_search_goes_on(tmp_path, where):
    import fxlrd

    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir").mkdir()
    path = tmp_path / "afile" / "latency.json" if where == "under_a_file" else tmp_path / "adir"
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
    config = LatencyConfig(backend="eager", cache_path=path, repeats=2, warmup=1, progress=False)
    with pytest.warns(UserWarning, match="latency cache .* cannot be written .* kept in memory only"):
        gm = fxlrd.transform(model, fxlrd.LRDConfig(latency=config), example_inputs=torch.randn(1, 8, 12, 12))
    assert len(gm.fxlrd_plan.layers) == 2
    assert (tmp_path / "afile").read_text() == "not a folder" and list((tmp_path / "adir").iterdir()) == []


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_timing_a_model_leaves_its_mode_alone(backend):
    from fxlrd.latency import make_timer

    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.BatchNorm1d(16)).train()
    model[2].eval()  # a frozen norm inside a training model
    modes = [m.training for m in model.modules()]
    run = make_timer(LatencyConfig(backend=backend, repeats=2, warmup=1, threads=1)).model_runner(
        model, ((torch.randn(4, 8),), {}))  # fmt: skip
    run()
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("tolerance", [float("nan"), float("inf"), -0.1])
def test_a_tolerance_that_is_not_a_finite_number_is_refused(tolerance):
    from fxlrd.errors import ConfigError

    with pytest.raises(ConfigError, match="tolerance must be a finite number >= 0"):
        LatencyConfig(tolerance=tolerance)


def test_cached_timings_that_are_not_seconds_are_measured_again(tmp_path):
    path = tmp_path / "lat.json"
    path.write_text('{"format": "fxlrd.latency-cache/1", "entries": {"nan": NaN, "neg": -1.0, "inf": Infinity, "ok": 0.5}}')
    with pytest.warns(UserWarning, match="3 timings are not finite seconds >= 0"):
        cache = LatencyCache(path)
    assert cache.get("ok") == 0.5 and cache.get("nan") is None and cache.get("neg") is None


# --- (mutation audit) keys, vector widths and medians ------------------------------------------------


def test_a_layer_in_another_dtype_has_another_cache_key(tmp_path):
    """A module's repr names no dtype: the key must, or a bfloat16 layer would be given the
    float32 layer's cached time (the torch backends time a layer in its own dtype)."""
    from fxlrd.ranks.search import RankSearcher

    searcher = RankSearcher(LatencyConfig(backend="eager", threads=1, cache_path=tmp_path / "c.json", progress=False))
    layer = nn.Linear(8, 8)
    keys = {searcher._key(layer.to(dtype), (2, 8)) for dtype in (torch.float32, torch.bfloat16, torch.float64)}
    assert len(keys) == 3


def test_rank_quantum_is_the_vector_width_in_float32_lanes():
    from fxlrd.timing import cpu_vector_extensions, default_rank_quantum

    assert default_rank_quantum(["AVX2", "AVX-512F"]) == 16
    assert default_rank_quantum(["AVX2"]) == 8
    assert default_rank_quantum(["NEON"]) == default_rank_quantum([]) == 4
    cpuinfo = "processor : 0\nflags : fpu sse avx2 fma\nprocessor : 1\nflags : fpu sse avx2 avx512f fma\n"
    assert cpu_vector_extensions(cpuinfo) == ["AVX2"]  # the first CPU's flags
    assert cpu_vector_extensions("Features : fp asimd sve\n") == ["NEON", "SVE"]


def test_median_times_takes_turns_after_warmup_and_reports_the_median(monkeypatch):
    """With a fake clock: each call of a variant lasts what its list says; the warm-up calls
    are not timed, the variants take turns, and the median (not the mean) is reported."""
    import fxlrd.timing as timing

    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    durations = {"a": iter([100.0, 100.0, 1.0, 2.0, 30.0]), "b": iter([100.0, 100.0, 5.0, 5.0, 6.0])}
    order = []

    def runner(name):
        def run():
            order.append(name)
            clock[0] += next(durations[name])
        return run

    out = timing.median_times({"a": runner("a"), "b": runner("b")}, repeats=3, warmup=2)
    assert order == ["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"]
    assert out["a"] == {"median": 2.0, "min": 1.0, "max": 30.0, "n": 3}
    assert out["b"] == {"median": 5.0, "min": 5.0, "max": 6.0, "n": 3}


def _ops_run(monkeypatch) -> list[set[str]]:
    """The operator types of every model a timing session runs (recorded; sessions made
    without ``threads`` read a model's inputs or calibrate it, and are not timed)."""
    import onnx

    import fxlrd.export

    made, real = [], fxlrd.export.onnx_session

    def spy(path, **kwargs):
        if "threads" in kwargs:
            data = path if isinstance(path, bytes) else open(path, "rb").read()
            made.append({n.op_type for n in onnx.load_from_string(data).graph.node})
        return real(path, **kwargs)

    monkeypatch.setattr(fxlrd.export, "onnx_session", spy)
    return made


@pytest.mark.parametrize("quantize,int8_ops", [("int8", {"QuantizeLinear", "DequantizeLinear"}),
                                                ("int8-dynamic", {"DynamicQuantizeLinear"})])  # fmt: skip
def test_int8_timing_runs_the_quantized_layer_and_model(monkeypatch, quantize, int8_ops):
    made = _ops_run(monkeypatch)
    timer = OnnxRuntimeTimer(LatencyConfig(quantize=quantize, repeats=2, warmup=1, threads=1))
    plain = OnnxRuntimeTimer(LatencyConfig(repeats=2, warmup=1, threads=1))
    assert timer.context == f"{plain.context}|{quantize}"  # cached apart from float32
    layer = nn.Linear(64, 32)
    assert timer.time(layer, (4, 64)) > 0
    assert int8_ops <= made[-1], made[-1]
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).train()
    x = torch.randn(4, 64)
    timer.model_runner(model, ((x,), {}))()
    assert int8_ops <= made[-1] and model.training  # the caller's model keeps its mode
    made.clear()
    plain.time(layer, (4, 64))
    assert not made[-1] & {"QuantizeLinear", "DynamicQuantizeLinear"}


def test_int8_timing_of_a_window_with_several_inputs(monkeypatch):
    """A window takes every value flowing in (a residual add's two inputs), each calibrated."""
    made = _ops_run(monkeypatch)

    class Add(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x, skip):
            return torch.relu(self.conv(x) + skip)

    timer = OnnxRuntimeTimer(LatencyConfig(quantize="int8", repeats=2, warmup=1, threads=1))
    assert timer.time_inputs(Add(), (torch.randn(1, 8, 6, 6), torch.randn(1, 8, 6, 6))) > 0
    assert "QuantizeLinear" in made[-1]


def test_latency_quantize_is_checked():
    from fxlrd.errors import ConfigError

    with pytest.raises(ConfigError, match="backend='onnxruntime'"):
        LatencyConfig(backend="eager", quantize="int8")
    with pytest.raises(ConfigError, match="latency quantize must be one of"):
        LatencyConfig(quantize="int4")
    assert LatencyConfig(quantize="int8").to_dict()["quantize"] == "int8"


def test_a_search_timed_in_int8_caches_int8_entries(tmp_path):
    import fxlrd
    from fxlrd import LRDConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1)).eval()  # fmt: skip
    latency = LatencyConfig(quantize="int8", context="neighbours", repeats=2, warmup=1, threads=1,
                            cache_path=tmp_path / "c.json", progress=False)  # fmt: skip
    x = torch.randn(1, 16, 12, 12)
    gm = fxlrd.transform(model, LRDConfig(ratio=2, latency=latency), example_inputs=x)
    keys = json.loads((tmp_path / "c.json").read_text())["entries"]
    assert keys and all("|int8|" in k for k in keys)
    assert gm.fxlrd_plan.settings["latency"]["quantize"] == "int8"


@pytest.mark.parametrize("quantize,layer,shape", [
    ("int8", nn.ConvTranspose2d(8, 8, 3), (1, 8, 6, 6)),  # static int8 leaves transposed convs in float
    ("int8-dynamic", nn.Conv2d(8, 8, 3), (1, 8, 6, 6)),  # dynamic int8 quantizes matrix products only
])  # fmt: skip
def test_int8_timing_times_what_the_mode_does_not_quantize_in_float(monkeypatch, quantize, layer, shape):
    made = _ops_run(monkeypatch)
    timer = OnnxRuntimeTimer(LatencyConfig(quantize=quantize, repeats=2, warmup=1, threads=1))
    assert timer.time(layer, shape) > 0  # (no "quantized no weight" error: the deployed model runs it in float)
    assert not made[-1] & {"QuantizeLinear", "DynamicQuantizeLinear", "DequantizeLinear"}, made[-1]


def test_shared_initializers_are_copied_through_chains_of_identities():
    import onnx
    from onnx import TensorProto, helper

    from fxlrd.latency import _shared_initializers_copied

    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, 2.0, 3.0, 4.0])
    nodes = [helper.make_node("Identity", ["w"], ["w1"]), helper.make_node("Identity", ["w1"], ["w2"]),
             helper.make_node("MatMul", ["x", "w2"], ["y"]), helper.make_node("Identity", ["w"], ["out"])]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]),
                               helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 2])], [w])  # fmt: skip
    model = onnx.load_from_string(_shared_initializers_copied(helper.make_model(graph).SerializeToString()))
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Identity"]  # a graph output stays an Identity
    assert sorted(i.name for i in model.graph.initializer) == ["w", "w1", "w2"]
    onnx.checker.check_model(model)


def test_global_mode_timed_in_int8_measures_int8_models(tmp_path, monkeypatch):
    import fxlrd
    from fxlrd import LRDConfig

    made = _ops_run(monkeypatch)
    whole, runner = [], OnnxRuntimeTimer.model_runner

    def model_runner(self, model, inputs):  # the sessions each whole-model trial made
        before = len(made)
        run = runner(self, model, inputs)
        whole.extend(made[before:])
        return run

    monkeypatch.setattr(OnnxRuntimeTimer, "model_runner", model_runner)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).eval()
    latency = LatencyConfig(quantize="int8", repeats=2, warmup=1, threads=1, cache_path=tmp_path / "c.json",
                            progress=False)  # fmt: skip
    with warnings.catch_warnings():  # (a layer this small may not reach the target in int8: not the point here)
        warnings.simplefilter("ignore", fxlrd.FxlrdWarning)
        gm = fxlrd.transform(model, LRDConfig(target_speedup=1.3, latency=latency), example_inputs=torch.randn(4, 256))
    assert gm.fxlrd_plan.settings["global_search"]["rounds"]
    assert whole and len(whole) < len(made)  # whole models, and the layers before them
    assert all("QuantizeLinear" in ops for ops in made)  # layers and whole models alike


def test_int8_timing_quantizes_convs_whose_equal_biases_the_exporter_shared(monkeypatch):
    """Batch norms at their initial values fold to equal conv biases, which the TorchScript
    exporter stores once and reads through Identity nodes; the quantizer then left those convs'
    biases in float and onnxruntime ran them about 3x slower than the deployed model would."""
    import onnx

    import fxlrd.export
    from fxlrd.latency import onnx_bytes

    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)).eval()  # fmt: skip
    x = torch.randn(1, 16, 8, 8)
    assert "Identity" in {n.op_type for n in onnx.load_from_string(onnx_bytes(model, x)).graph.node}  # the case
    timed, real = [], fxlrd.export.onnx_session

    def spy(path, **kwargs):
        timed.append(path) if "threads" in kwargs else None
        return real(path, **kwargs)

    monkeypatch.setattr(fxlrd.export, "onnx_session", spy)
    OnnxRuntimeTimer(LatencyConfig(quantize="int8", repeats=2, warmup=1, threads=1)).time(model, tuple(x.shape))
    graph = onnx.load_from_string(timed[-1]).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 and all(made_by.get(n.input[2]) == "DequantizeLinear" for n in convs)


@pytest.mark.parametrize("model_repeats,expected", [(None, 12), (5, 5)])
def test_whole_models_are_timed_with_model_repeats_samples(monkeypatch, model_repeats, expected):
    """Global mode's trials (`speedup_model`, `time_model`) take ``model_repeats`` samples,
    4 × ``repeats`` by default; a layer's timing keeps ``repeats``."""
    import fxlrd.timing as timing

    seen = []
    real = timing.median_times
    monkeypatch.setattr(timing, "median_times", lambda runs, *, repeats, warmup: seen.append(repeats) or real(
        runs, repeats=repeats, warmup=warmup))
    calls = {"n": 0}

    def count():
        calls["n"] += 1

    timer = make_timer(LatencyConfig(backend="eager", repeats=3, model_repeats=model_repeats, warmup=0, threads=1))
    monkeypatch.setattr(type(timer), "model_runner", lambda self, model, inputs: count)
    timer.speedup_model(nn.Linear(2, 2), nn.Linear(2, 2), ((torch.randn(1, 2),), {}))
    assert seen == [expected] and calls["n"] == 2 * expected
    import fxlrd.latency

    sampled, real_call_time = [], fxlrd.latency.median_call_time
    monkeypatch.setattr(fxlrd.latency, "median_call_time", lambda fn, *, repeats, warmup: sampled.append(repeats) or
                        real_call_time(fn, repeats=repeats, warmup=warmup))  # fmt: skip
    timer.time_model(nn.Linear(2, 2), ((torch.randn(1, 2),), {}))
    assert sampled == [expected]
    seen.clear()
    timer.speedup(nn.Linear(2, 2), nn.Linear(2, 2), (1, 2))
    assert seen == [3]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "60"])
def test_model_repeats_is_checked(bad):
    from fxlrd.errors import ConfigError

    with pytest.raises(ConfigError, match="model_repeats must be a positive int"):
        LatencyConfig(model_repeats=bad)
