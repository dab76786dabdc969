"""fxlrd.save / fxlrd.load: bitwise round trips, refused corrupt saves, atomic writes."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import fxlrd
import fxlrd.io as fio
from fxlrd import Factorized, LRDConfig, PlanMismatchError
from fxlrd.io import SavedModelError
from fxlrd.recover import reestimate_norms
from fxlrd.zoo.resnet import Bottleneck


class TinyNet(nn.Module):
    """A small ResNet: a 3×3 stem, two bottlenecks (one strided with a downsample), a classifier."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=False), nn.BatchNorm2d(2 * width))
        self.block1 = Bottleneck(width, width // 2, 2, down)
        self.block2 = Bottleneck(2 * width, width // 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.block2(self.block1(self.relu(self.bn(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _tiny(width: int = 32, classes: int = 10) -> nn.Module:
    model = TinyNet(width, classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _perturb(gm: nn.Module) -> None:
    """Stand-in for fine-tuning: the saved values then differ from a fresh decomposition."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def assert_bitwise(gm: nn.Module, loaded: nn.Module) -> None:
    a, b = gm.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].device == b[k].device, k
        assert torch.equal(a[k], b[k]), k


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under the save's parent (names and bytes): what a refused load must not change."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize(
    "config",
    [LRDConfig(rank_quantum=1), LRDConfig(merge="approximate", rank_quantum=1), LRDConfig(branches=2, rank_quantum=1)],
    ids=["cnn", "merged", "branched"],
)
def test_round_trip_is_bitwise(tmp_path, x, config):
    model = _tiny()
    before = _state(model)
    gm = fxlrd.transform(model, config, example_inputs=x)
    if config.merge:
        assert reestimate_norms(gm, [torch.randn(4, 3, 32, 32) for _ in range(2)])  # moved norms get real statistics
    _perturb(gm)
    path = fxlrd.save(gm, tmp_path / "saved")
    assert sorted(os.listdir(path)) == ["metadata.json", "model.safetensors", "plan.json"]

    loaded = fxlrd.load(model, path)
    assert_bitwise(gm, loaded)
    with torch.no_grad():
        assert torch.equal(gm(x), loaded(x))
    assert loaded.fxlrd_plan.to_dict() == gm.fxlrd_plan.to_dict()
    assert loaded.fxlrd_capture["mode"] == "fx" and not loaded.training
    facts = {n: (m.method, m.ranks, m.source) for n, m in loaded.named_modules() if isinstance(m, Factorized)}
    assert facts == {n: (m.method, m.ranks, m.source) for n, m in gm.named_modules() if isinstance(m, Factorized)}
    if config.branches > 1:
        assert loaded.get_submodule("block1.conv2.core").groups == 2
    # the user's model is untouched
    assert not any(isinstance(m, Factorized) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bert_captured_with_export_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100, max_position_embeddings=64)  # fmt: skip
    model = transformers.BertModel(config).eval()
    ids, mask = torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    gm = fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs={"input_ids": ids, "attention_mask": mask},
                         capture="export")  # fmt: skip
    assert gm.fxlrd_plan.settings["capture"]["mode"] == "export"
    _perturb(gm)
    path = fxlrd.save(gm, tmp_path / "bert")
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["inputs"]["kwargs"]["input_ids"] == {"shape": [2, 8], "dtype": "int64"}

    loaded = fxlrd.load(model, path)
    assert_bitwise(gm, loaded)
    ids2, mask2 = torch.randint(0, 100, (3, 11)), torch.ones(3, 11, dtype=torch.long)  # other batch and length
    with torch.no_grad():
        a, b = gm(input_ids=ids2, attention_mask=mask2), loaded(input_ids=ids2, attention_mask=mask2)
    assert type(a) is type(b)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(a.pooler_output, b.pooler_output)
    assert isinstance(loaded.get_submodule("encoder.layer.0.attention.self.query"), Factorized)


def test_export_save_into_a_model_with_other_inputs_is_a_plan_mismatch(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100, max_position_embeddings=64)  # fmt: skip
    model = transformers.BertModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    path = fxlrd.save(fxlrd.transform(model, LRDConfig(), example_inputs=inputs, capture="export"), tmp_path / "s")
    with pytest.raises(PlanMismatchError, match="inputs do not fit this TinyNet .*saved from a BertModel"):
        fxlrd.load(_tiny(), path)


class Gate(nn.Module):
    """``len`` of a tensor: torch.fx cannot trace it, so it must be a leaf."""

    def forward(self, x):
        return x / len(x)


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _tiny()
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.body(x))


def test_recorded_leaf_modules_are_found_again(tmp_path, x):
    model = Gated().eval()
    gm = fxlrd.transform(model, LRDConfig(rank_quantum=1, leaf_modules=[Gate]), example_inputs=x, capture="fx")
    loaded = fxlrd.load(model, fxlrd.save(gm, tmp_path / "s"))  # the plan records "Gate"; load finds the type
    assert_bitwise(gm, loaded)
    with torch.no_grad():
        assert torch.equal(gm(x), loaded(x))


def test_dtype_frozen_factors_train_mode_and_ties_survive(tmp_path, x):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _tiny()
            self.a = nn.Linear(10, 10)
            self.b = nn.Linear(10, 10)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(self.body(x)))

    model = Tied()
    gm = fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=x)
    assert gm.fxlrd_plan["a"].method == "keep"  # tied: kept
    gm = gm.double().train()
    gm.get_submodule("body.bn").eval()
    fxlrd.freeze(gm, "paper")
    path = fxlrd.save(gm, tmp_path / "s")
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["aliases"] == {"b.weight": "a.weight"}  # stored once

    loaded = fxlrd.load(model, path)
    assert_bitwise(gm, loaded)
    assert loaded.get_submodule("a").weight is loaded.get_submodule("b").weight
    assert loaded.training and not loaded.get_submodule("body.bn").training
    flags = lambda m: {n: p.requires_grad for n, p in m.named_parameters()}  # noqa: E731
    assert flags(loaded) == flags(gm) and not all(flags(gm).values())
    with torch.no_grad():
        assert torch.equal(gm.eval()(x.double()), loaded.eval()(x.double()))


def test_a_compiled_model_is_frozen_and_saved_as_its_own_module(tmp_path, x):
    # torch.compile's wrapper prefixed every name with _orig_mod.: the save could never be loaded,
    # and freeze policies' patterns matched nothing
    model = _tiny()
    gm = fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=x)
    compiled = torch.compile(gm)
    assert fxlrd.freeze(compiled, {"block1.*": False}) is compiled
    frozen = {n for n, p in gm.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("block1.") for n in frozen)
    _perturb(gm)
    path = fxlrd.save(compiled, tmp_path / "s")
    assert not any(n.startswith("_orig_mod") for n in json.loads((path / "metadata.json").read_text())["frozen"])
    loaded = fxlrd.load(model, path)
    assert_bitwise(gm, loaded)
    assert {n for n, p in loaded.named_parameters() if not p.requires_grad} == frozen


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["fx", "export"])
def test_an_unsaved_buffer_takes_the_dtype_it_was_saved_in(tmp_path, dtype, mode):
    # a persistent=False buffer is made again by the model, in float32: a .half() save failed to run after load
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 8)
            self.register_buffer("scale", torch.linspace(0.5, 1.5, 64), persistent=False)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) * self.scale)

    x = torch.randn(4, 32)
    torch.manual_seed(0)
    gm = fxlrd.transform(Scaled().eval(), LRDConfig(rank_quantum=1), example_inputs=x, capture=mode).to(dtype)
    path = fxlrd.save(gm, tmp_path / "s")
    loaded = fxlrd.load(Scaled().eval(), path)
    assert {n: b.dtype for n, b in loaded.named_buffers()} == {n: b.dtype for n, b in gm.named_buffers()}
    with torch.no_grad():
        assert torch.equal(loaded(x.to(dtype)), gm(x.to(dtype)))


def test_a_file_is_not_a_save(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"weights")
    with pytest.raises(SavedModelError, match="model.pt is a file: an fxlrd save is the directory fxlrd.save wrote"):
        fxlrd.load(_tiny(), tmp_path / "model.pt")


def test_load_into_another_model_is_a_plan_mismatch(tmp_path, x):
    path = fxlrd.save(fxlrd.transform(_tiny(), LRDConfig(rank_quantum=1), example_inputs=x), tmp_path / "s")
    snapshot = _snapshot(tmp_path)
    other = _tiny(width=48)  # same layer names, other shapes
    before = _state(other)
    with pytest.raises(PlanMismatchError, match="plan does not match the model at 'stem'"):
        fxlrd.load(other, path)
    with pytest.raises(PlanMismatchError, match="no conv/linear layer there"):
        fxlrd.load(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), path)
    assert _snapshot(tmp_path) == snapshot
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_kept_layer_of_another_shape_is_named(tmp_path, x):
    config = LRDConfig(rank_quantum=1, exclude=["fc"])
    path = fxlrd.save(fxlrd.transform(_tiny(), config, example_inputs=x), tmp_path / "s")
    message = r"does not fit this TinyNet: tensors 2 of other shapes \(fc.weight \[10, 64\] saved"
    with pytest.raises(PlanMismatchError, match=message):
        fxlrd.load(_tiny(classes=12), path)  # the plan keeps fc: only the tensors tell


def _truncate(path: Path) -> None:
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])


def _flip(name: str):
    def flip(path: Path) -> None:
        data = bytearray((path / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (path / name).write_bytes(bytes(data))

    return flip


def _remove(name: str):
    return lambda path: (path / name).unlink()


def _newer_format(path: Path) -> None:
    meta = json.loads((path / "metadata.json").read_text())
    meta["format"] = "fxlrd.saved-model/2"
    (path / "metadata.json").write_text(json.dumps(meta))


def _other_plan(path: Path) -> None:
    other = fxlrd.transform(_tiny(), LRDConfig(ratio=4, rank_quantum=1), example_inputs=torch.randn(1, 3, 32, 32))
    (path / "plan.json").write_text(other.fxlrd_plan.to_json() + "\n")


def _edit_metadata(key: str, value):
    def edit(path: Path) -> None:
        meta = json.loads((path / "metadata.json").read_text())
        if key == "bytes":
            meta["files"]["plan.json"]["bytes"] = value
        else:
            meta[key] = value
        (path / "metadata.json").write_text(json.dumps(meta))

    return edit


@pytest.mark.parametrize(
    "corrupt, error, message",
    [
        (_truncate, SavedModelError, r"model.safetensors has \d+ bytes, the save recorded \d+: the file is truncated"),
        (_flip("model.safetensors"), SavedModelError, "model.safetensors does not match its sha256"),
        (_flip("plan.json"), SavedModelError, "plan.json does not match its sha256"),
        (_remove("plan.json"), SavedModelError, "plan.json is missing"),
        (_remove("model.safetensors"), SavedModelError, "model.safetensors is missing"),
        (_remove("metadata.json"), SavedModelError, "metadata.json is missing"),
        (_other_plan, SavedModelError, "plan.json (has .* bytes|does not match)"),
        (_newer_format, SavedModelError, "format version 2 .* reads format versions up to 1: upgrade fxlrd"),
        # the metadata is not hashed: an edited field failed deep inside load, or loaded silently wrong
        (_edit_metadata("bytes", "12"), SavedModelError, "metadata.json: field 'files' is not what fxlrd.save writes"),
        (_edit_metadata("modes", "eval"), SavedModelError, "field 'modes' is not what fxlrd.save writes"),
        (_edit_metadata("frozen", "stem"), SavedModelError, "field 'frozen' is not what fxlrd.save writes"),
        (_edit_metadata("aliases", ["a"]), SavedModelError, "field 'aliases' is not what fxlrd.save writes"),
    ],
    ids=["truncated", "flipped-weights", "flipped-plan", "no-plan", "no-weights", "no-metadata", "other-plan", "newer",
         "bytes-text", "modes-text", "frozen-text", "aliases-list"],  # fmt: skip
)
def test_corrupt_saves_are_refused_and_nothing_changes(tmp_path, x, corrupt, error, message):
    model = _tiny()
    path = fxlrd.save(fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=x), tmp_path / "s")
    corrupt(path)
    snapshot, before = _snapshot(tmp_path), _state(model)
    with pytest.raises(error, match=message):
        fxlrd.load(model, path)
    assert _snapshot(tmp_path) == snapshot
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_consistent_plan_of_another_model_is_a_plan_mismatch(tmp_path, x):
    """A plan swapped in with its hash updated: the structure then disagrees with the tensors."""
    model = _tiny()
    path = fxlrd.save(fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=x), tmp_path / "s")
    _other_plan(path)
    meta = json.loads((path / "metadata.json").read_text())
    plan = path / "plan.json"
    meta["files"]["plan.json"] = {"sha256": fio._sha256(plan), "bytes": plan.stat().st_size}
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(PlanMismatchError, match=r"does not fit this TinyNet: tensors \d+ of other shapes \(stem.core"):
        fxlrd.load(model, path)


def test_missing_directory_and_not_a_plan_carrier(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fxlrd.load(_tiny(), tmp_path / "nowhere")
    with pytest.raises(TypeError, match="needs the GraphModule that fxlrd.transform"):
        fxlrd.save(_tiny(), tmp_path / "s")
    assert not any(tmp_path.iterdir())


def test_existing_directory_needs_overwrite_and_nothing_is_written(tmp_path, x):
    gm = fxlrd.transform(_tiny(), LRDConfig(rank_quantum=1), example_inputs=x)
    path = fxlrd.save(gm, tmp_path / "s")
    snapshot = _snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        fxlrd.save(gm, path)
    assert _snapshot(tmp_path) == snapshot and sorted(os.listdir(tmp_path)) == ["s"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other content than an fxlrd saved model"):
        fxlrd.save(gm, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_the_save(tmp_path, x):
    model = _tiny()
    first = fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=x)
    second = fxlrd.transform(model, LRDConfig(ratio=3, rank_quantum=1), example_inputs=x)
    path = fxlrd.save(first, tmp_path / "s")
    fxlrd.save(second, path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["s"]
    assert_bitwise(second, fxlrd.load(model, path))
    (path / "model.onnx").write_bytes(b"the user's export beside the save")  # replaced with the save, silently
    with pytest.raises(FileExistsError, match="files fxlrd.save did not write \\(model.onnx\\); refusing to delete"):
        fxlrd.save(first, path, overwrite=True)
    assert (path / "model.onnx").read_bytes() == b"the user's export beside the save"
    assert_bitwise(second, fxlrd.load(model, path))


def _interrupt_weights(monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)


def _interrupt_move_in(monkeypatch):
    real = fio._move

    def move(src, dst):
        if Path(src).name.startswith(".s.tmp-"):  # the new save, after the old one went aside
            raise OSError("interrupted")
        real(src, dst)

    monkeypatch.setattr(fio, "_move", move)


def _interrupt_metadata(monkeypatch):
    monkeypatch.setattr(fio, "_sha256", lambda path: (_ for _ in ()).throw(KeyboardInterrupt()))


@pytest.mark.parametrize("interrupt", [_interrupt_weights, _interrupt_move_in, _interrupt_metadata],
                         ids=["while-writing-weights", "between-renames", "keyboard-interrupt"])  # fmt: skip
def test_interrupted_overwrite_leaves_the_previous_save(tmp_path, x, monkeypatch, interrupt):
    model = _tiny()
    old = fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=x)
    path = fxlrd.save(old, tmp_path / "s")
    snapshot = _snapshot(tmp_path)
    new = fxlrd.transform(model, LRDConfig(ratio=3, rank_quantum=1), example_inputs=x)
    interrupt(monkeypatch)
    with pytest.raises((OSError, KeyboardInterrupt)):
        fxlrd.save(new, path, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["s"]  # no temporary or set-aside directory behind
    assert _snapshot(tmp_path) == snapshot
    assert_bitwise(old, fxlrd.load(model, path))


def test_interrupted_first_save_leaves_nothing(tmp_path, x, monkeypatch):
    gm = fxlrd.transform(_tiny(), LRDConfig(rank_quantum=1), example_inputs=x)
    _interrupt_weights(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        fxlrd.save(gm, tmp_path / "s")
    assert not any(tmp_path.iterdir())


def test_metadata_records_versions_hashes_and_inputs(tmp_path, x):
    gm = fxlrd.transform(_tiny(), LRDConfig(rank_quantum=1), example_inputs=x)
    path = fxlrd.save(gm, tmp_path / "deep" / "s")  # parents are created
    meta = fio.verify(path)
    assert meta["format"] == "fxlrd.saved-model/1" and meta["fxlrd"] == fxlrd.__version__
    assert meta["torch"] == torch.__version__ and meta["python"] and meta["created"]
    assert set(meta["files"]) == {"plan.json", "model.safetensors"}
    assert meta["inputs"] == {"args": [{"shape": [2, 3, 32, 32], "dtype": "float32"}], "kwargs": {}}
    assert oct((path / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert b"pickle" not in (path / "model.safetensors").read_bytes()[:200]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_loads_on_cuda_or_where_asked(tmp_path, x):
    model = _tiny()
    gm = fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=x).cuda()
    path = fxlrd.save(gm, tmp_path / "s")
    assert json.loads((path / "metadata.json").read_text())["device"] == "cuda:0"
    loaded = fxlrd.load(model, path)  # the CPU model: tensors go where they were saved
    assert all(t.is_cuda for t in loaded.state_dict().values())
    assert_bitwise(gm, loaded)
    with torch.no_grad():
        assert torch.equal(gm(x.cuda()), loaded(x.cuda()))
    on_cpu = fxlrd.load(model, path, device="cpu")
    assert all(t.device.type == "cpu" for t in on_cpu.state_dict().values())


class _WithPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.register_buffer("positions", torch.arange(16.0), persistent=False)

    def forward(self, x):
        return self.fc(x + self.positions)


def test_a_meta_skeleton_loads_and_cannot_be_planned(tmp_path):
    """load reads only the structure of the model it is given, so a model built on the meta
    device (no memory for weights) works; planning one needs its weights: a clear error."""
    make = lambda: nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1))  # noqa: E731
    x = torch.randn(1, 3, 8, 8)
    gm = fxlrd.transform(make().eval(), LRDConfig(ratio=2), example_inputs=x)
    fxlrd.save(gm, tmp_path / "s")
    with torch.device("meta"):
        skeleton = make()
    loaded = fxlrd.load(skeleton, tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)
    with torch.device("meta"):
        skeleton = make()
    with pytest.raises(fxlrd.ConfigError, match="weights on the meta device"):
        fxlrd.plan(skeleton)
    fxlrd.save(fxlrd.transform(_WithPositions().eval(), LRDConfig(rank_quantum=1)), tmp_path / "p")
    with torch.device("meta"):
        skeleton = _WithPositions()
    with pytest.raises(SavedModelError, match="'positions' is on the meta device and not in the save"):
        fxlrd.load(skeleton, tmp_path / "p")


def test_an_export_capture_loads_onto_a_model_fresh_in_training_mode(tmp_path, x):
    """torch.export bakes the mode into the graph: a reload captures in the saved mode, not
    in the mode of the model it is given (nn.Modules are built in training mode)."""
    model = _tiny()
    gm = fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=x, capture="export")
    fxlrd.save(gm, tmp_path / "s")
    fresh = TinyNet()  # training mode, other values: the save's replace them
    loaded = fxlrd.load(fresh, tmp_path / "s")
    assert fresh.training and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)  # no batch statistics, nothing updated
    assert_bitwise(gm, loaded)


class WithUnsavedBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.full((32,), 2.0), persistent=False)
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x * self.scale)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_deep_copy_with_a_buffer_kept_out_of_the_state_dict_saves_and_loads(tmp_path, capture):
    """A GraphModule's deep copy registers its own buffers again as persistent ("keep the
    best checkpoint" while fine-tuning): its save still loads."""
    import copy

    torch.manual_seed(0)
    x = torch.randn(4, 32)
    gm = fxlrd.transform(WithUnsavedBuffer().eval(), LRDConfig(rank_quantum=1), example_inputs=x, capture=capture)
    fxlrd.save(copy.deepcopy(gm), tmp_path / "s")
    loaded = fxlrd.load(WithUnsavedBuffer().eval(), tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)


class Frames(nn.Module):
    """Reshapes its (batch, time, channels) float input: only dynamic_shapes keep time dynamic."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        b, t, c = x.shape
        return self.fc2(torch.relu(self.fc1(x.reshape(b * t, c)))).reshape(b, t, -1).mean(1)


def test_load_and_apply_take_the_dynamic_shapes_the_capture_was_given(tmp_path):
    from torch.export import Dim

    torch.manual_seed(0)
    shapes = {"x": {0: Dim("b", max=64), 1: Dim("t", max=128)}}
    x, other = torch.randn(4, 6, 32), torch.randn(3, 9, 32)
    gm = fxlrd.transform(Frames().eval(), LRDConfig(rank_quantum=1), example_inputs=x, capture="export",
                         dynamic_shapes=shapes)  # fmt: skip
    fxlrd.save(gm, tmp_path / "s")
    with pytest.warns(fxlrd.FxlrdWarning, match="captured with dynamic_shapes=... of its own"):
        fxlrd.load(Frames().eval(), tmp_path / "s")
    loaded = fxlrd.load(Frames().eval(), tmp_path / "s", dynamic_shapes=shapes)
    applied = fxlrd.apply(Frames().eval(), gm.fxlrd_plan, example_inputs=x, dynamic_shapes=shapes)
    with torch.no_grad():
        torch.testing.assert_close(loaded(other), gm(other), rtol=0, atol=0)
        assert applied(other).shape == (3, 32)


def test_apply_of_an_export_plan_captures_in_the_plans_mode(x):
    model = _tiny()
    gm = fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=x, capture="export")
    fresh = TinyNet()  # training mode
    fresh.load_state_dict(model.state_dict())
    applied = fxlrd.apply(fresh, fxlrd.Plan.from_json(gm.fxlrd_plan.to_json()), example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(applied(x), gm(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(applied(x), applied(x), rtol=0, atol=0)  # no batch statistics


def test_a_linear_with_its_batch_norm_folded_by_an_exact_merge_loads(tmp_path):
    """merge='exact' folds a BatchNorm1d into the linear layer before it where the norm's input
    is 2-D, which merging reads from the recorded input shapes: load reads them too (it kept
    the norm and refused the save)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.bn = nn.Linear(16, 16), nn.BatchNorm1d(16)
            self.q, self.o = nn.Linear(16, 48), nn.Linear(48, 16)

        def forward(self, x):
            return self.o(self.q(self.bn(self.proj(x))))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(8, 16)
    cfg = LRDConfig(rank_rule="fixed", rank=64, allow_larger=True, merge="exact", decompose_pointwise=True,
                    exclude=["proj", "o"])  # fmt: skip
    gm = fxlrd.transform(model, cfg, example_inputs=x, capture="fx")
    assert "bn" not in dict(gm.named_modules())  # folded
    fxlrd.save(gm, tmp_path / "s")
    loaded = fxlrd.load(Net().eval(), tmp_path / "s")
    assert torch.equal(loaded(x), gm(x))


@pytest.mark.parametrize("loaded_in", ["train", "eval"])
def test_a_model_merged_in_training_mode_loads_with_the_norms_it_kept(tmp_path, loaded_in):
    """An approximate merge keeps a training-mode norm it would have to fold (nothing between to
    move it past): load merged in eval mode, folded it, and refused its own save."""
    make = lambda: nn.Sequential(nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32), nn.Conv2d(32, 32, 3, padding=1),  # noqa: E731
                                 nn.BatchNorm2d(32), nn.Conv2d(32, 8, 1))  # fmt: skip
    torch.manual_seed(0)
    model, x = make().train(), torch.randn(2, 8, 6, 6)
    gm = fxlrd.transform(model, LRDConfig(ratio=2, merge="approximate", rank_quantum=1), example_inputs=x)
    assert {"1", "3"} <= dict(gm.named_modules()).keys()  # the norms kept: nothing merged
    fxlrd.save(gm, tmp_path / "s")
    loaded = fxlrd.load(make().train(loaded_in == "train"), tmp_path / "s")
    assert loaded.code == gm.code
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), gm.eval()(x))


def test_an_older_save_merged_in_training_mode_still_loads(tmp_path):
    """Saves from before plans recorded ``merge_training_norms``: load rebuilds as if every norm
    was in training mode when the eval-mode merge does not fit the tensors; a save that fits
    neither way is still the plan's mismatch."""
    make = lambda: nn.Sequential(nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32), nn.Conv2d(32, 32, 3, padding=1),  # noqa: E731
                                 nn.BatchNorm2d(32), nn.Conv2d(32, 8, 1))  # fmt: skip
    torch.manual_seed(0)
    model, x = make().train(), torch.randn(2, 8, 6, 6)
    gm = fxlrd.transform(model, LRDConfig(ratio=2, merge="approximate", rank_quantum=1), example_inputs=x)
    path = fxlrd.save(gm, tmp_path / "s")
    plan = path / "plan.json"
    data = json.loads(plan.read_text())
    assert data["settings"].pop("merge_training_norms") == ["1", "3"]
    plan.write_text(json.dumps(data))
    meta = json.loads((path / "metadata.json").read_text())
    meta["files"]["plan.json"] = {"sha256": fio._sha256(plan), "bytes": plan.stat().st_size}
    (path / "metadata.json").write_text(json.dumps(meta))
    loaded = fxlrd.load(make().eval(), path)
    assert loaded.code == gm.code
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), gm.eval()(x))
    other = nn.Sequential(nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32), nn.Conv2d(32, 16, 3, padding=1),
                          nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1))  # fmt: skip
    with pytest.raises(PlanMismatchError, match="the plan has Conv2d 32->32 .* the model has Conv2d 32->16"):
        fxlrd.load(other, path)
    from safetensors.torch import load_file, save_file

    tensors = path / "model.safetensors"  # a tensor gone: it fits neither way; the error is the plan's own build's
    saved = load_file(tensors)
    dropped = sorted(saved)[-1]
    save_file({k: v for k, v in saved.items() if k != dropped}, tensors)
    meta["files"]["model.safetensors"] = {"sha256": fio._sha256(tensors), "bytes": tensors.stat().st_size}
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(PlanMismatchError, match=r"saved but not in the model \(1\.num_batches_tracked") as caught:
        fxlrd.load(make().eval(), path)
    assert dropped not in str(caught.value)


def test_a_merged_fx_save_loads_into_a_model_built_on_the_meta_device(tmp_path):
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 48), nn.Linear(48, 16))  # noqa: E731
    model, x = make().eval(), torch.randn(8, 16)
    cfg = LRDConfig(rank_rule="fixed", rank=64, allow_larger=True, merge="exact", decompose_pointwise=True, exclude=["0", "3"])
    gm = fxlrd.transform(model, cfg, example_inputs=x, capture="fx")
    fxlrd.save(gm, tmp_path / "s")
    with torch.device("meta"):
        empty = make().eval()
    assert torch.equal(fxlrd.load(empty, tmp_path / "s")(x), gm(x))


def test_an_export_capture_save_loads_into_a_model_built_on_the_meta_device(tmp_path):
    """torch.export captures the meta model with meta inputs made from the recorded signature,
    and its parameters (weakly referenced by the export graph) are replaced, not swapped."""

    class Attn(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

        def forward(self, x):
            return self.o(torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ self.v(x))

    torch.manual_seed(0)
    model, x = Attn().eval(), torch.randn(2, 5, 16)
    gm = fxlrd.transform(model, LRDConfig(ratio=1.5, rank_quantum=1, exclude=["o"]), example_inputs=x, capture="export")
    fxlrd.save(gm, tmp_path / "s")
    with torch.device("meta"):
        empty = Attn().eval()
    loaded = fxlrd.load(empty, tmp_path / "s")
    assert torch.equal(loaded(x), gm(x))
    assert not any(t.is_meta for t in loaded.state_dict().values())


def test_an_export_save_in_bfloat16_loaded_into_a_float32_model_says_to_cast_it(tmp_path):
    """A Llama's export graph bakes its RMSNorm casts in: loaded into a float32 model (as every
    Hugging Face constructor builds it) the bfloat16 save used to load, then fail at its
    first call."""
    transformers = pytest.importorskip("transformers")

    def build():
        cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
        return transformers.LlamaModel(cfg).eval()

    torch.manual_seed(0)
    x = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    gm = fxlrd.transform(build().to(torch.bfloat16), LRDConfig(ratio=2), example_inputs=x)
    path = fxlrd.save(gm, tmp_path / "s")
    with pytest.raises(SavedModelError, match=r"cast the model first, fxlrd.load\(model.to\(torch.bfloat16\)"):
        fxlrd.load(build(), path)
    loaded = fxlrd.load(build().to(torch.bfloat16), path)
    with torch.no_grad():
        assert torch.equal(loaded(**x).last_hidden_state, gm(**x).last_hidden_state)


def test_the_dtype_check_of_a_load_leaves_the_norms_statistics_alone(tmp_path):
    """Loading a half save of a training-mode export capture into a float32 model runs the graph
    once to check its dtypes: the batch norm it runs in training mode must not keep that run's
    statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8)).train()
    x = torch.randn(4, 16)
    with pytest.warns(UserWarning, match="training mode"):
        gm = fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=x, capture="export")
    gm = gm.to(torch.float16)
    path = fxlrd.save(gm, tmp_path / "s")
    with pytest.warns(UserWarning):
        loaded = fxlrd.load(copy.deepcopy(model), path)
    for (name, a), b in zip(gm.named_buffers(), loaded.buffers()):
        assert torch.equal(a, b), name


def test_tensors_that_are_views_of_one_storage_at_other_offsets_are_no_ties(tmp_path):
    """(mutation audit) two state-dict entries are one tensor only when they share storage,
    offset, shape and strides: two rows of one buffer (same storage, shape and strides, other
    offsets) are saved apart, and load with their own values."""

    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            base = torch.randn(2, 8)
            self.register_buffer("scale", base[0])
            self.register_buffer("shift", base[1])

        def forward(self, x):
            return self.fc(x) * self.scale + self.shift

    model = Rows().eval()
    x = torch.randn(3, 8)
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=4), example_inputs=x)
    path = fxlrd.save(gm, tmp_path / "s")
    assert not json.loads((path / "metadata.json").read_text()).get("aliases")
    loaded = fxlrd.load(model, path)
    assert_bitwise(gm, loaded)
    assert not torch.equal(loaded.get_buffer("scale"), loaded.get_buffer("shift"))
    with torch.no_grad():
        assert torch.equal(gm(x), loaded(x))


def test_a_save_with_a_tensor_the_model_lacks_is_a_plan_mismatch_naming_it(tmp_path):
    """(mutation audit) a saved tensor the rebuilt model has no place for is named as such
    (not a bare load_state_dict error), and the model given is not changed."""

    class Net(nn.Module):
        def __init__(self, extra: bool):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            if extra:
                self.register_buffer("offset", torch.randn(8))
            self.extra = extra

        def forward(self, x):
            y = self.fc(x)
            return y + self.offset if self.extra else y

    x = torch.randn(2, 8)
    path = fxlrd.save(fxlrd.transform(Net(True).eval(), LRDConfig(rank_rule="fixed", rank=4), example_inputs=x),
                      tmp_path / "s")  # fmt: skip
    other = Net(False).eval()
    before = _state(other)
    with pytest.raises(PlanMismatchError, match=r"1 saved but not in the model \(offset\)"):
        fxlrd.load(other, path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


@pytest.mark.parametrize("capture_mode", ["fx", "export"])
def test_a_save_loads_into_the_same_model_cast_to_another_dtype(tmp_path, capture_mode):
    """The model given is only the structure: cast after the save (float64 here), it loads
    the saved float32 model under either capture (an export capture was refused as "another
    model": its recorded inputs, float32, did not run through the cast model)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_context import Bottleneck

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = fxlrd.transform(Bottleneck().eval(), LRDConfig(rank_quantum=1), example_inputs=x, capture=capture_mode)
    path = fxlrd.save(gm, tmp_path / "s")
    loaded = fxlrd.load(Bottleneck().eval().double(), path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))


def test_save_refuses_to_replace_a_symbolic_link_or_a_file_saying_which(tmp_path, x):
    gm = fxlrd.transform(_tiny(), LRDConfig(rank_quantum=1), example_inputs=x)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    with pytest.raises(FileExistsError, match=r"link is a symbolic link; refusing to replace it .*save to the directory it points to"):
        fxlrd.save(gm, tmp_path / "link", overwrite=True)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="file exists and is not a directory"):
        fxlrd.save(gm, tmp_path / "file", overwrite=True)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "file").read_text() == "mine"
    assert not any((tmp_path / "real").iterdir())


def test_a_save_loads_bitwise_into_the_model_in_its_own_dtype_taking_inputs_of_another(tmp_path):
    """A bfloat16 model taking float32 inputs (it casts them itself, and keeps a float32
    residual): its recorded float32 inputs capture it as saved; cast to its dtype, they
    changed the loaded graph's residual."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x.to(torch.bfloat16)))).float() + x

    torch.manual_seed(0)
    model, x = Mixed().eval().to(torch.bfloat16), torch.randn(4, 16)
    gm = fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=x, capture="export")
    path = fxlrd.save(gm, tmp_path / "s")
    loaded = fxlrd.load(Mixed().eval().to(torch.bfloat16), path)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
