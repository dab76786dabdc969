"""The fxlrd command: each subcommand's happy path, and errors as one line with the right exit status."""

import contextlib
import io
import json
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import fxlrd
from fxlrd.cli import build_parser, load_model, main

ROOT = Path(__file__).resolve().parents[1]

MODELS_PY = textwrap.dedent(
    """
    import torch
    from torch import nn


    class SmallNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(32)
            self.conv2 = nn.Conv2d(32, 64, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(64)
            self.conv3 = nn.Conv2d(64, 64, 3, padding=1, stride=2)
            self.conv4 = nn.Conv2d(64, 32, 1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(self.bn2(self.conv2(x)))
            x = torch.relu(self.conv4(torch.relu(self.conv3(x))))
            return self.fc(x.mean((2, 3)))


    def factory():
        return SmallNet()


    def broken():
        raise RuntimeError("no weights here")


    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16), nn.Linear(16, 4))


    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.q(x) * self.k(x) + self.v(x)


    def qkv():
        torch.manual_seed(0)
        return QKV()


    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(16, 4)
            self.up = nn.Parameter(torch.randn(4, 32, 16) / 4)

        def forward(self, x):
            idx = self.router(x).argmax(-1)
            return torch.bmm(self.up[idx], x.unsqueeze(-1)).squeeze(-1)


    def moe():
        torch.manual_seed(0)
        return MoE()
    """
)


@pytest.fixture
def factory(tmp_path, monkeypatch):
    """``fxlrd_cli_models:factory`` importable, and a safetensors weights file for it."""
    from safetensors.torch import save_file

    (tmp_path / "fxlrd_cli_models.py").write_text(MODELS_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fxlrd_cli_models", None)
    import fxlrd_cli_models

    torch.manual_seed(3)
    model = fxlrd_cli_models.factory()
    with torch.no_grad():
        for name in ("bn1", "bn2"):
            getattr(model, name).running_mean.uniform_(-0.5, 0.5)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    yield "fxlrd_cli_models:factory", weights, model
    sys.modules.pop("fxlrd_cli_models", None)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- compress ------------------------------------------------------------------------------------
def test_compress_factory_with_weights_onnx_save_and_report(tmp_path, capsys, factory):
    spec, weights, reference = factory
    out_dir = tmp_path / "out"
    code, out, err = _run(capsys, "compress", spec, "--weights", weights, "--input-shape", "2,3,32,32",
                          "--quantum", 1, "--repeats", 3, "--eval-batches", 2, "--onnx", out_dir / "m.onnx",
                          "--save", out_dir / "saved", "--report", out_dir / "report.json")  # fmt: skip
    assert code == 0, err
    assert "Traceback" not in err
    assert "conv3" in out and "tucker2" in out  # the plan table
    for label in ("params", "MACs", "speed-up", "relative error", "top-1 agreement", "mean cosine", "onnxruntime CPU"):
        assert label in out, label
    report = json.loads((out_dir / "report.json").read_text())
    assert report["format"] == "fxlrd.report/1" and report["environment"]["cpus"]
    assert report["params"]["compressed"] < report["params"]["original"] and report["macs"]["ratio"] > 1
    assert report["latency"]["backend"] == "onnxruntime" and report["latency"]["original"]["n"] == 3
    assert report["latency"]["speedup"] > 0 and report["fidelity"]["batches"] == 2
    assert 0 <= report["fidelity"]["top1_agreement"] <= 1 and report["fidelity"]["relative_error"] < 1
    assert (out_dir / "m.onnx").stat().st_size > 0
    # the saved model loads onto a fresh instance, and carries the --weights (not the factory's init)
    import fxlrd_cli_models

    loaded = fxlrd.load(fxlrd_cli_models.factory(), out_dir / "saved")
    assert torch.equal(loaded.get_submodule("bn1").running_mean, reference.bn1.running_mean)


def test_load_model_says_whose_weights_a_model_has(factory):
    # a factory's own weights may be random or pretrained: the note says where they came from
    spec, weights, _ = factory
    assert load_model(spec).notes == ["weights as factory() made them (no --weights)"]
    assert load_model(spec, weights=str(weights)).notes == []
    assert load_model("resnet50").notes == ["random weights"]


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_compress_with_a_calibration_tensor_file(tmp_path, capsys, factory, kind):
    spec, _, _ = factory
    data = torch.randn(10, 3, 32, 32)
    path = tmp_path / f"calib.{kind}"
    if kind == "pt":
        torch.save(data, path)
    else:
        from safetensors.torch import save_file

        save_file({"images": data}, str(path))
    report_path = tmp_path / "r.json"
    code, out, err = _run(capsys, "compress", spec, "--input-shape", "2,3,32,32", "--calibration", path,
                          "--calibration-batches", 3, "--eval-batches", 2, "--repeats", 0,
                          "--report", report_path)  # fmt: skip
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["calibration"]["batches"] == 3 and report["latency"] is None
    assert "2 held-out batches of" in report["fidelity"]["inputs"] and "not used for calibration" in out
    assert any(lp["data_aware"] for lp in report["plan"]["layers"])


def _compress_calibrated(capsys, tmp_path, spec, *options) -> dict:
    """``fxlrd compress`` on 8 random images as calibration data, one held-out batch, no timing;
    the JSON report (the run must succeed)."""
    path, report_path = tmp_path / "calib.pt", tmp_path / "r.json"
    torch.save(torch.randn(8, 3, 32, 32), path)
    code, _, err = _run(capsys, "compress", spec, "--input-shape", "2,3,32,32", "--calibration", path,
                        "--eval-batches", 1, "--repeats", 0, "--report", report_path, *options)  # fmt: skip
    assert code == 0, err
    return json.loads(report_path.read_text())


@pytest.mark.parametrize("scheme", ["static", "dynamic"])
def test_compress_int8_writes_the_onnx_file_in_int8_and_measures_it(tmp_path, capsys, factory, scheme):
    import onnx

    spec, _, _ = factory
    path, report_path, onnx_path = tmp_path / "calib.pt", tmp_path / "r.json", tmp_path / "m.onnx"
    torch.save(torch.randn(12, 3, 32, 32), path)
    code, out, err = _run(capsys, "compress", spec, "--input-shape", "2,3,32,32", "--calibration", path,
                          "--calibration-batches", 4, "--eval-batches", 2, "--repeats", 2, "--quantum", 4,
                          "--onnx", onnx_path, "--int8", scheme, "--report", report_path)  # fmt: skip
    assert code == 0, err
    ops = {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
    assert ("QuantizeLinear" in ops) if scheme == "static" else ("DynamicQuantizeLinear" in ops and "QuantizeLinear" not in ops)
    report = json.loads(report_path.read_text())
    q = report["int8"]
    assert q["scheme"] == scheme and q["fidelity"]["batches"] == 2 and "held-out" in q["fidelity"]["inputs"]
    assert 0 < q["fidelity"]["relative_error"] < 1 and q["fidelity"]["relative_error"] != report["fidelity"]["relative_error"]
    lat = report["latency"]
    assert lat["int8"]["n"] == 2 and lat["speedup_int8"] > 0 and lat["compressed"]["n"] == 2
    assert f"int8 ({scheme})" in out and "; int8 " in out and f"ONNX in {scheme} int8" in out
    w = q["weights"]  # a CNN: static int8 stores the convs' weights in int8, dynamic only the linears'
    assert 0 < w["int8"] <= w["total"] and f"int8 weights {w['int8']} of {w['total']}" in out
    assert (2 * w["int8"] < w["total"]) == (scheme == "dynamic")
    assert ("use --int8 static" in out) == (scheme == "dynamic")


def test_compress_int8_needs_onnx_and_static_needs_calibration(tmp_path, capsys, factory):
    spec, _, _ = factory
    base = ("compress", spec, "--input-shape", "2,3,32,32", "--repeats", 0)
    code, _, err = _run(capsys, *base, "--int8", "dynamic")
    assert code == 2 and "pass --onnx PATH" in err
    code, _, err = _run(capsys, *base, "--int8", "static", "--onnx", tmp_path / "m.onnx")
    assert code == 2 and "pass --calibration" in err and "--int8 dynamic" in err
    assert not (tmp_path / "m.onnx").exists()
    code, _, err = _run(capsys, *base, "--int8", "int4", "--onnx", tmp_path / "m.onnx")
    assert code == 2 and "--int8" in err


def test_compress_with_global_allocation_and_sequential_fitting(tmp_path, capsys, factory):
    spec, _, _ = factory
    report = _compress_calibrated(capsys, tmp_path, spec, "--calibration-batches", 3, "--ratio", 1.5, "--allocation",
                                  "global", "--sequential", "--quantum", 4, "--sensitivity", "kl")  # fmt: skip
    settings = report["settings"]
    assert settings["allocation"] == "global" and settings["sequential"] is True and settings["rank_quantum"] == 4
    assert settings["sensitivity"] == "kl" and settings["sensitivity_matrix"] == "full"
    code, _, err = _run(capsys, "compress", spec, "--input-shape", "2,3,32,32", "--repeats", 0, "--allocation", "best")
    assert code == 2 and "--allocation" in err


def test_compress_with_a_folder_of_images_and_merge(tmp_path, capsys, factory):
    from PIL import Image

    spec, _, _ = factory
    folder = tmp_path / "images" / "class_a"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        pixels = torch.randint(0, 256, (40 + i, 50, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    report_path = tmp_path / "r.json"
    code, out, err = _run(capsys, "compress", spec, "--input-shape", "2,3,32,32", "--calibration", tmp_path / "images",
                          "--calibration-batches", 2, "--merge", "approximate", "--backend", "eager", "--repeats", 2,
                          "--report", report_path)  # fmt: skip
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["calibration"]["batches"] == 2 and report["settings"]["merge"] == "approximate"
    assert report["fidelity"]["inputs"].startswith("1 held-out batch")
    assert report["latency"]["backend"] == "eager" and "eager, batch 2" in out


@pytest.mark.slow
@pytest.mark.parametrize("terminal", [True, False])
def test_quiet_hides_hugging_face_s_loading_bar_and_leaves_its_setting(tmp_path, capfd, monkeypatch, terminal):
    """The bar shows on a terminal only (as fxlrd's own), and never with quiet."""
    transformers = pytest.importorskip("transformers")
    import fxlrd.cli
    from fxlrd.cli import _load_huggingface

    monkeypatch.setattr(fxlrd.cli, "sys", types.SimpleNamespace(stderr=types.SimpleNamespace(isatty=lambda: terminal)))

    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     vocab_size=50, max_position_embeddings=16)  # fmt: skip
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    hf_logging = transformers.utils.logging
    hf_logging.enable_progress_bar()
    capfd.readouterr()
    _load_huggingface(tmp_path / "bert", quiet=False)
    shown = capfd.readouterr().err
    _load_huggingface(tmp_path / "bert", quiet=True)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the process's setting is back
    if not terminal:
        assert "Loading weights" not in shown
    elif "Loading weights" not in shown:  # this transformers shows no bar here, or tqdm is off: nothing to compare
        pytest.skip("transformers printed no loading bar without quiet either")


def _tiny_bert(tmp_path):
    """A one-layer BERT (64 positions) with a word-level tokenizer of w0..w89, saved in tmp_path/bert."""
    transformers = pytest.importorskip("transformers")
    model_dir = tmp_path / "bert"
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(model_dir)
    words = [f"w{i}" for i in range(90)]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(model_dir)
    return model_dir


def test_compress_hugging_face_directory_with_text_calibration(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    model_dir = _tiny_bert(tmp_path)
    words = [f"w{i}" for i in range(90)]
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(" ".join(words[(i * 7 + j) % 90] for j in range(3 + i % 5)) for i in range(12)))
    code, out, err = _run(capsys, "compress", model_dir, "--seq-len", 16, "--batch", 2, "--calibration", lines,
                          "--calibration-batches", 3, "--eval-batches", 2, "--backend", "eager", "--repeats", 2,
                          "--distill", 10, "--save", tmp_path / "saved")  # fmt: skip
    assert code == 0, err
    assert "distilled 10 steps" in out  # on the tokenized calibration lines, padding left out
    assert "captured with export" in out and "mean-pooled over the attention mask" in out
    assert "encoder.layer.0.intermediate.dense" in out
    loaded = fxlrd.load(transformers.AutoModel.from_pretrained(model_dir), tmp_path / "saved")
    assert loaded.fxlrd_plan.settings["capture"]["mode"] == "export"
    batch = transformers.AutoTokenizer.from_pretrained(model_dir)(["w1 w2 w3", "w4 w5"], return_tensors="pt",
                                                                   padding=True)  # fmt: skip
    assert "token_type_ids" in batch
    assert loaded(**batch).last_hidden_state.shape[:2] == (2, 5)  # the tokenizer's own output (was a TypeError)
    # no --seq-len: 128 tokens, but this model's position table holds 64 (a plain compress failed)
    code, out, err = _run(capsys, "compress", model_dir, "--repeats", 0, "--eval-batches", 1)
    assert code == 0 and "input_ids, token_type_ids, attention_mask int64[1, 64]" in out, err
    code, _, err = _run(capsys, "compress", model_dir, "--size", 32)
    assert code == 2 and "--size is for image models; for a text model use --seq-len" in err


def test_a_factory_returning_a_hugging_face_model_takes_token_ids(tmp_path, capsys, monkeypatch):
    """``module:factory`` returning a transformers model (a mixture of experts here) is a text
    model, as its directory would be: --seq-len, random token ids below its vocabulary."""
    pytest.importorskip("transformers")
    (tmp_path / "fxlrd_cli_moe.py").write_text(
        "import torch, transformers\n"
        "def build():\n"
        "    cfg = transformers.Qwen3MoeConfig(vocab_size=50, hidden_size=32, intermediate_size=64, moe_intermediate_size=48,\n"
        "        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2)\n"
        "    torch.manual_seed(0)\n"
        "    return transformers.Qwen3MoeModel._from_config(cfg, experts_implementation='batched_mm')\n"
    )  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fxlrd_cli_moe", None)
    code, out, err = _run(capsys, "compress", "fxlrd_cli_moe:build", "--seq-len", 8, "--batch", 2, "--repeats", 1,
                          "--eval-batches", 1, "--quantum", 1)  # fmt: skip
    assert code == 0, err
    assert "input_ids" in out and "int64[2, 8]" in out and "stacked expert weights" in out
    # torch.onnx's own torch.export fails on this model; it is timed on onnxruntime as fxlrd's capture of it
    assert "latency     onnxruntime CPU" in out and "timed in eager torch instead" not in out
    code, _, err = _run(capsys, "compress", "fxlrd_cli_moe:build", "--input-shape", "1,3,8,8")
    assert code == 2 and "--input-shape is for tensor inputs; for a text model use --batch and --seq-len" in err
    (tmp_path / "lines.txt").write_text("some text\nmore text\n")
    code, _, err = _run(capsys, "compress", "fxlrd_cli_moe:build", "--calibration", tmp_path / "lines.txt")
    assert code == 2 and "the model has no tokenizer (a model directory can hold one); give token ids as a" in err


# -- plan, inspect, bench, demo ------------------------------------------------------------------
def test_plan_command_prints_the_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "plan.json"
    code, out, _ = _run(capsys, "plan", "--model", "resnet50", "--size", "64", "--json", path)
    assert code == 0
    assert "layer4.2.conv2" in out and "tucker2" in out and "model params" in out
    assert json.loads(path.read_text())["format"] == "fxlrd.plan/1"
    code, out2, _ = _run(capsys, "inspect", path)
    assert code == 0 and "layer4.2.conv2" in out2


def test_plan_with_latency_search_in_context(tmp_path, capsys, factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "plan.json"
    code, _, err = _run(capsys, "plan", "--model", factory[0], "--input-shape", "1,3,16,16", "--latency", "eager",
                        "--timing-context", "neighbours", "--quiet", "--json", path)  # fmt: skip
    assert code == 0, err
    notes = [lp["latency"]["note"] for lp in json.loads(path.read_text())["layers"] if lp.get("latency")]
    assert notes and all("timed in a window" in note for note in notes)
    assert json.loads(path.read_text())["settings"]["latency"]["context"] == "neighbours"
    assert (tmp_path / "cache" / "fxlrd" / "latency.json").exists()


def test_inspect_a_save_a_report_and_a_corrupt_save(tmp_path, capsys, factory, monkeypatch):
    spec, _, _ = factory
    code, _, err = _run(capsys, "compress", spec, "--input-shape", "1,3,32,32", "--repeats", 0, "--eval-batches", 1,
                        "--save", tmp_path / "s", "--report", tmp_path / "r.json")  # fmt: skip
    assert code == 0, err
    code, out, _ = _run(capsys, "inspect", tmp_path / "s")
    assert code == 0
    assert "fxlrd.saved-model/1" in out and "integrity   ok" in out and "captured with fx" in out and "conv3" in out
    code, out, _ = _run(capsys, "inspect", tmp_path / "r.json")
    assert code == 0 and "params" in out and "fidelity" in out and "conv3" in out

    class ClosedPipe(io.StringIO):  # `fxlrd inspect DIR | head`: the reader went away
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    with contextlib.redirect_stdout(ClosedPipe()):
        code = main(["inspect", str(tmp_path / "s")])
    assert code == 0 and "error" not in capsys.readouterr().err
    import fxlrd.cli as cli  # a broken pipe elsewhere (stdout still open) is an error like any other

    @contextlib.contextmanager
    def elsewhere(debug):
        raise BrokenPipeError(32, "Broken pipe")
        yield

    monkeypatch.setattr(cli, "_library_noise", elsewhere)
    code = main(["inspect", str(tmp_path / "s")])
    assert code == 1 and "Broken pipe" in capsys.readouterr().err
    monkeypatch.undo()
    weights = tmp_path / "s" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    code, out, _ = _run(capsys, "inspect", tmp_path / "s")
    assert code == 1 and "integrity   FAILED" in out and "truncated" in out
    (tmp_path / "junk.json").write_text("{}")
    code, _, err = _run(capsys, "inspect", tmp_path / "junk.json")
    assert code == 2 and err.startswith("fxlrd: error: ") and "not an fxlrd report" in err


def test_bench_times_variants_side_by_side(tmp_path, capsys, factory):
    spec, _, _ = factory
    plot, report_path = tmp_path / "bench.png", tmp_path / "bench.json"
    code, out, err = _run(capsys, "bench", spec, "--input-shape", "1,3,32,32",
                          "--variants", "original,vanilla,quantized,merged", "--backend", "eager", "--repeats", 3,
                          "--eval-batches", 1, "--plot", plot, "--report", report_path)  # fmt: skip
    assert code == 0, err
    for header in ("variant", "MAC ratio", "median ms", "speed-up/MAC ratio"):
        assert header in out
    for variant in ("original", "vanilla", "quantized", "merged"):
        assert f"\n{variant} " in out
    report = json.loads(report_path.read_text())
    rows = report["variants"]
    assert rows["original"]["speedup"] == pytest.approx(1.0) and rows["original"]["mac_ratio"] == pytest.approx(1.0)
    assert rows["merged"]["layers"] < rows["quantized"]["layers"]
    assert all(r["latency"]["n"] == 3 for r in rows.values())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size < 100_000
    code, out2, _ = _run(capsys, "inspect", report_path)
    assert code == 0 and "speed-up/MAC ratio" in out2


@pytest.mark.slow
def test_demo_writes_onnx_save_and_report(tmp_path, capsys):
    code, out, err = _run(capsys, "demo", "--model", "resnet50", "--size", 64, "--out", tmp_path, "--repeats", 2,
                          "--eval-batches", 1)  # fmt: skip
    assert code == 0, err
    assert "fxlrd demo on" in out and "speed-up" in out and "eager" not in out
    assert "layer4.2.conv2" in out and "54 -> 124 conv/linear" in out and "random weights" in out
    assert {p.name for p in tmp_path.iterdir()} == {"resnet50_lrd.onnx", "resnet50_lrd", "resnet50_report.json"}
    assert fxlrd.io.verify(tmp_path / "resnet50_lrd")["model_class"] == "ResNet"
    assert "Warning" not in err and "Traceback" not in err


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["compress", "no_such_model"], 2, "unknown model 'no_such_model'"),
        (["compress", "no_such_module_xyz:factory"], 2, "cannot import 'no_such_module_xyz'"),
        (["compress", "{spec}", "--input-shape", "1,3,x"], 2, "argument --input-shape: expected sizes separated by"),
        (["compress", "{spec}", "--input-shape", "1,0,32"], 2, "expected positive sizes"),
        (["compress", "{spec}", "--weights", "{tmp}/gone.safetensors"], 1, "weights file .*gone.* does not exist"),
        (["compress", "{spec}", "--weights", "{tmp}/w.npz"], 2, "use a .safetensors, .pt or .pth file"),
        (["compress", "{spec}", "--save", "{tmp}/afile/s"], 1, "cannot write --save .*afile is not a directory"),
        (["compress", "{spec}", "--onnx", "{tmp}/afile/m.onnx"], 1, "cannot write --onnx .*afile is not a directory"),
        (["compress", "{spec}", "--onnx", "{tmp}"], 1, "cannot write --onnx .* it is a directory"),
        # os.access says yes to root; the file system refuses (the error came after the run, naming a temporary file)
        (["compress", "{spec}", "--report", "/proc/r.json"], 1, "cannot write --report /proc/r.json: /proc (refuses new|is not writable)"),
        (["compress", "{spec}", "--save", "{tmp}"], 2, "--save .* already exists; add --overwrite"),
        (["compress", "{spec}", "--ratio", "1"], 2, "ratio must be a number > 1"),
        (["compress", "{spec}", "--rank-rule", "fixed"], 2, "--rank-rule fixed needs --rank R"),
        (["compress", "{spec}", "--rank-rule", "energy"], 2, "--rank-rule energy needs --energy E"),
        (["compress", "{spec}", "--rank", "4"], 2, "--rank applies to --rank-rule fixed"),
        (["compress", "{spec}", "--energy", "0.5"], 2, "--energy applies to --rank-rule energy"),
        (["compress", "{spec}", "--bogus"], 2, r"unrecognized arguments: --bogus \(see 'fxlrd compress --help'\)"),
        (["plan", "{spec}", "--calibration", "x"], 2, r"arguments: --calibration x \(see 'fxlrd plan --help'\)"),
        (["compress", "fxlrd_cli_models:broken"], 1, r"calling fxlrd_cli_models:broken\(\) failed: RuntimeError: no"),
        (["compress", "fxlrd_cli_models:nothing"], 2, "has no attribute 'nothing'"),
        (["compress", "{spec}", "--input-shape", "1,3"], 2, r"does not take inputs float32\[1, 3\] .*--input-shape"),
        (["compress", "{spec}", "--batch", "0"], 2, "argument --batch: must be an integer >= 1"),
        (["compress", "{spec}", "--seq-len", "16"], 2, "--seq-len is for text models .* use --input-shape"),  # was ignored
        (["compress", "{spec}", "--ratio", "3", "--target-params", "0.5"], 2, "--ratio 3 and --target-params both set"),
        (["compress", "{spec}", "--sensitivity", "kl"], 2, "--sensitivity kl fits the layers on data: add --calibration"),
        (["compress", "{spec}", "--overwrite"], 2, "--overwrite replaces an existing --save directory: add --save DIR"),
        (["compress", "{spec}", "--batch", "2", "--input-shape", "1,3,32,32"], 2, "--batch 2 contradicts --input"),
        (["compress", "{spec}", "--calibration", "{tmp}/nothing.pt"], 1, "calibration data .*nothing.pt does not"),
        # before the model is loaded (a broken factory would fail first)
        (["compress", "fxlrd_cli_models:broken", "--calibration", "{tmp}/no.pt"], 1, "calibration data .*no.pt does not"),
        (["compress", "{spec}", "--size", "32", "--input-shape", "1,3,32,32"], 2, "--size 32 and --input-shape 1,3,32"),
        (["compress", "{spec}", "--target-params", "1.5"], 2, "expected a parameter count .* got '1.5'"),
        (["compress", "{spec}", "--timing-context", "neighbours"], 2, "--timing-context neighbours applies to the latency"),
        (["compress", "{spec}", "--timing-int8", "static"], 2, "--timing-int8 static applies to the latency search"),
        (["compress", "{spec}", "--timing-int8", "static", "--latency", "eager"], 2,
         "--timing-int8 static times layers in onnxruntime's int8, not on eager: use --latency onnxruntime$"),
        (["compress", "{spec}", "--timing-int8", "static", "--target-speedup", "1.5", "--backend", "eager"], 2,
         "not on eager: use --latency onnxruntime \\(or --backend onnxruntime\\)$"),
        (["bench", "{spec}", "--timing-int8", "static", "--latency", "onnxruntime", "--variants", "vanilla"], 2,
         "--timing-int8 static applies to the latency search: add optimized to --variants$"),
        (["compress", "{spec}", "--target-params", "1.0"], 2, "1 is neither a fraction of the model below 1"),
        (["compress", "{spec}", "--target-params", "1"], 2, "1 is neither a fraction of the model below 1"),
        (["compress", "{spec}", "--target-params", "inf"], 2, "expected a parameter count .* got 'inf'"),
        (["inspect", "{tmp}/nowhere"], 1, "nowhere does not exist"),
        (["compress", "{tmp}/nowhere.py:make"], 1, "nowhere.py does not exist"),  # missing: 1, as the README says
        (["inspect", "/dev/null"], 2, "/dev/null is not a file or a directory"),
        (["inspect", "{tmp}/report.json"], 1, r"report.json is malformed \(KeyError"),
        ([], 2, "the following arguments are required: COMMAND"),
    ],
)
def test_errors_are_one_line_with_the_right_exit_status(tmp_path, capsys, factory, argv, code, message):
    import re

    spec, _, _ = factory
    (tmp_path / "afile").write_text("a file, not a folder")
    (tmp_path / "report.json").write_text('{"format": "fxlrd.report/1"}')  # a report edited down to its format
    argv = [a.format(spec=spec, tmp=tmp_path) for a in argv]
    got, out, err = _run(capsys, *argv)
    assert got == code, err
    assert err.startswith("fxlrd: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_bad_weight_and_calibration_files_get_their_own_errors(tmp_path, capsys, factory):
    """A truncated weights file is called that (the hint said torch refuses pickled objects); a
    directory is not 'missing'; NaN calibration names its file (it failed later, in the Gram
    matrix, exit 1); an unstacked sample says so (the hint asked for another --input-shape)."""
    spec, weights, model = factory
    torch.save(model.state_dict(), tmp_path / "w.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "w.pt").read_bytes()[:2000])
    (tmp_path / "d.pt").mkdir()
    torch.save(torch.full((4, 3, 32, 32), float("nan")), tmp_path / "nan.pt")
    torch.save(torch.randn(3, 32, 32), tmp_path / "one.pt")
    shape = ("--input-shape", "1,3,32,32", "--repeats", 0)
    for argv, code, message in [
        (("--weights", tmp_path / "trunc.pt"), 1, r"cannot read weights file .*trunc.pt: .*\(truncated or corrupt\?"),
        (("--weights", tmp_path / "d.pt"), 2, r"--weights .*d.pt is a directory; give the weights file in it"),
        (("--calibration", tmp_path / "nan.pt"), 2, r"--calibration .*nan.pt holds NaN or infinite values \(12288 of"),
        (("--calibration", tmp_path / "one.pt"), 2, r"one.pt holds one sample without its batch dimension \(\[3, 32, 32\]\)"),
    ]:  # fmt: skip
        got, _, err = _run(capsys, "compress", spec, *shape, *argv)
        assert got == code and err.count("\n") == 1 and re.search(message, err), err



def test_a_pickled_whole_model_as_weights_is_refused_in_one_plain_line(tmp_path, capsys, factory):
    spec, _, model = factory
    torch.save(model, tmp_path / "whole.pt")
    code, _, err = _run(capsys, "compress", spec, "--weights", tmp_path / "whole.pt")
    assert code == 2 and err.count("\n") == 1 and "\x1b" not in err, err  # one line, no terminal colour codes
    assert "holds a whole model or other Python objects" in err and "save model.state_dict()" in err


def test_weights_that_do_not_fit_are_named(tmp_path, capsys, factory):
    from safetensors.torch import save_file

    spec, _, model = factory
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "fc.bias"}
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "bad.safetensors"))
    code, _, err = _run(capsys, "compress", spec, "--weights", tmp_path / "bad.safetensors")
    assert code == 1 and "do not fit SmallNet: keys 1 missing (fc.bias); 1 unexpected (extra.weight)" in err
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ckpt.pt")  # a checkpoint dict is unwrapped
    code, _, err = _run(capsys, "compress", spec, "--weights", tmp_path / "ckpt.pt", "--input-shape", "1,3,32,32",
                        "--repeats", 0, "--eval-batches", 1)  # fmt: skip
    assert code == 0, err


def test_debug_shows_the_traceback(capsys, factory):
    code, _, err = _run(capsys, "compress", "fxlrd_cli_models:broken", "--debug")
    assert code == 1 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("fxlrd: error: calling")


def test_help_reads_well_and_runs_as_a_module():
    run = lambda *argv: subprocess.run([sys.executable, "-m", "fxlrd", *argv], cwd=ROOT, capture_output=True, text=True,
                                       timeout=120)  # noqa: E731
    proc = run("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    for word in ("compress", "inspect", "bench", "demo", "examples:", "exit status"):
        assert word in proc.stdout
    proc = run("compress")
    assert proc.returncode == 2 and proc.stderr.startswith("fxlrd: error: the following arguments are required: MODEL")


@pytest.mark.parametrize("command", ["compress", "bench", "inspect", "plan", "demo"])
def test_each_command_has_help(capsys, command):
    code, out, _ = _run(capsys, command, "--help")
    assert code == 0 and out.startswith(f"usage: fxlrd {command}")


def test_compress_mlp_option_reaches_the_config(tmp_path, capsys, factory):
    spec, _, _ = factory
    settings = _compress_calibrated(capsys, tmp_path, spec, "--calibration-batches", 2, "--mlp", "narrow", "--quantum", 4)["settings"]
    assert settings["mlp"] == "narrow" and not settings.get("narrowed")  # a CNN: no linear MLP block to narrow
    code, _, err = _run(capsys, "compress", spec, "--input-shape", "2,3,32,32", "--repeats", 0, "--mlp", "narrow")
    assert code == 2 and "calibration" in err


def test_compress_reconstruct_retrains_the_narrowed_blocks(tmp_path, capsys, factory):
    path, report_path = tmp_path / "calib.pt", tmp_path / "r.json"
    torch.save(torch.randn(64, 16), path)
    base = ["compress", "fxlrd_cli_models:mlp", "--input-shape", "8,16", "--calibration", path, "--eval-batches", 1,
            "--repeats", 0, "--sensitivity", "off", "--mlp", "narrow", "--quantum", 4, "--report", report_path]  # fmt: skip
    code, out, err = _run(capsys, *base, "--reconstruct", 40)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    (block,) = report["reconstructed"].values()
    assert block["down"] == "2" and block["positions"] == 8 * 7  # the calibration batches: 64 rows less the held-out one
    assert "narrowed MLP blocks retrained" in out
    code, out, err = _run(capsys, *base)
    assert code == 0 and json.loads(report_path.read_text())["reconstructed"] is None
    code, _, err = _run(capsys, *base[:-8], "--reconstruct", 40)  # no --mlp narrow
    assert code == 2 and "--reconstruct 40 refits narrowed MLP blocks: pass --mlp narrow" in err


def test_compress_distill_trains_the_compressed_model_towards_the_original(tmp_path, capsys, factory):
    path, report_path = tmp_path / "calib.pt", tmp_path / "r.json"
    torch.manual_seed(0)
    torch.save(torch.randn(144, 16), path)  # 18 batches of 8: 16 calibrate, 2 held out for fidelity
    base = ["compress", "fxlrd_cli_models:mlp", "--input-shape", "8,16", "--calibration", path, "--eval-batches", 2,
            "--repeats", 0, "--rank-rule", "fixed", "--rank", 4, "--quantum", 1, "--report", report_path]  # fmt: skip
    code, out, err = _run(capsys, *base)
    assert code == 0, err
    plain = json.loads(report_path.read_text())
    assert plain["distilled"] is None and "distilled" not in out
    code, out, err = _run(capsys, *base, "--distill", 150, "--distill-lr", "3e-3")
    assert code == 0, err
    report = json.loads(report_path.read_text())
    d = report["distilled"]
    # of the 16 calibration batches, an eighth (2) are held out for early stopping
    assert d["steps"] == 150 and d["lr"] == 3e-3 and d["batches"] == 14 and d["validation_batches"] == 2
    assert d["loss_last"] < 0.6 * d["loss_first"]
    assert 0 < d["kept_step"] < 150 and d["validation_kept"] < d["validation_start"]  # it stopped early
    assert "distilled 150 steps" in out and "early stopping on 2 held-out calibration batches" in out
    # measured on the fidelity batches, which it never trained or stopped on: 0.35 against 0.41
    assert report["fidelity"]["relative_error"] < 0.93 * plain["fidelity"]["relative_error"]
    code, _, err = _run(capsys, *base[:4], "--input-shape", "8,16", "--repeats", 0, "--distill", 5)  # no --calibration
    assert code == 2 and "--distill 5 trains the compressed model to match the original on real inputs: pass --calibration" in err
    code, _, err = _run(capsys, *base, "--distill", 5, "--distill-lr", "-1")
    assert code == 2 and "must be a number > 0" in err


def test_fidelity_of_a_text_model_leaves_padding_tokens_out():
    from fxlrd.cli import fidelity

    class Tokens(torch.nn.Module):
        def __init__(self, junk=0.0, scale=1.0):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.junk, self.scale = torch.nn.Embedding(20, 4), junk, scale

        def forward(self, input_ids, attention_mask):
            m = attention_mask[..., None].float()
            return self.emb(input_ids) * m * self.scale + self.junk * (1 - m)

    batch = {"input_ids": torch.randint(0, 20, (2, 5)), "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])}
    same = fidelity(Tokens(), Tokens(junk=100.0), [batch])  # differs at padding only
    assert same["relative_error"] == 0 and same["cosine"] == pytest.approx(1.0)
    assert fidelity(Tokens(), Tokens(scale=1.5), [batch])["relative_error"] == pytest.approx(0.5)


def test_fxlrd_warnings_reach_the_terminal(tmp_path, capsys, factory):
    """The command line hides libraries' warnings, not fxlrd's own (a target not reached)."""
    import warnings

    from fxlrd.cli import _library_noise
    from fxlrd.errors import FxlrdWarning

    with _library_noise(debug=False):
        warnings.warn("torch says something", UserWarning)
        warnings.warn("target_speedup=3 was not reached", FxlrdWarning)
    err = capsys.readouterr().err
    assert "fxlrd: warning: target_speedup=3 was not reached" in err and "torch says" not in err


def test_reports_are_strict_json(tmp_path):
    from fxlrd.cli import _write_json

    _write_json(tmp_path / "r.json", {"error": float("nan"), "runs": [1.5, float("inf")], "nested": {"x": -float("inf")}})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}")) == \
        {"error": None, "runs": [1.5, None], "nested": {"x": None}}  # fmt: skip


def test_hugging_face_directory_keeps_its_task_head_and_takes_the_tokenizers_tensors(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100, max_position_embeddings=64, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "cls")
    ids = torch.randint(5, 100, (12, 16))
    save_file({"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids)},
              str(tmp_path / "cal.safetensors"))  # what a BERT tokenizer returns
    code, out, err = _run(capsys, "compress", tmp_path / "cls", "--seq-len", 16, "--batch", 4, "--calibration",
                          tmp_path / "cal.safetensors", "--backend", "eager", "--repeats", 1, "--save", tmp_path / "s")  # fmt: skip
    assert code == 0, err
    assert "BertForSequenceClassification" in out and "top-1 agreement" in out  # the classifier's logits
    assert fxlrd.io.verify(tmp_path / "s")["model_class"] == "BertForSequenceClassification"


def test_a_bert_directory_without_a_tokenizer_is_captured_with_token_type_ids(tmp_path, capsys):
    """Without a tokenizer to say which inputs it returns, a model taking token_type_ids gets
    them (zeros): the saved model then takes a BERT tokenizer's output (it refused them)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    code, out, err = _run(capsys, "compress", tmp_path / "bert", "--seq-len", 8, "--batch", 2, "--backend", "eager",
                          "--repeats", 1, "--eval-batches", 1, "--save", tmp_path / "s")  # fmt: skip
    assert code == 0, err
    assert "token_type_ids" in out
    model = transformers.BertModel(config).eval()
    loaded = fxlrd.load(model, tmp_path / "s")
    ids = torch.randint(5, 100, (3, 8))
    out = loaded(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids))
    assert out["last_hidden_state"].shape == (3, 8, 32)
    # GPT-2 takes token_type_ids too, as embeddings of its vocabulary: zeros would change it; none are given
    gpt2 = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=64)
    transformers.GPT2Model(gpt2).save_pretrained(tmp_path / "gpt2")
    code, out, err = _run(capsys, "compress", tmp_path / "gpt2", "--seq-len", 8, "--batch", 2, "--backend", "eager",
                          "--repeats", 1, "--eval-batches", 1, "--save", tmp_path / "g")  # fmt: skip
    assert code == 0, err
    assert "token_type_ids" not in out
    loaded = fxlrd.load(transformers.GPT2Model(gpt2).eval(), tmp_path / "g")
    assert loaded(input_ids=ids, attention_mask=torch.ones_like(ids))["last_hidden_state"].shape == (3, 8, 32)


def test_fidelity_counts_top1_agreement_per_real_token_for_token_logits():
    # token classification / language-model logits (batch, tokens, classes): agreement over real tokens
    from fxlrd.cli import fidelity

    logits = torch.randn(2, 4, 5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    flipped = logits.clone()
    flipped[0, 3] = -flipped[0, 3]  # a padding token: not counted
    flipped[1, 0] = -flipped[1, 0]  # a real token: one of five disagrees

    def model(out):
        return lambda input_ids, attention_mask: {"logits": out}

    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask}
    assert fidelity(model(logits), model(flipped), [batch])["top1_agreement"] == pytest.approx(4 / 5)
    hidden = fidelity(lambda **k: {"last_hidden_state": logits}, lambda **k: {"last_hidden_state": flipped}, [batch])
    assert hidden["top1_agreement"] is None  # hidden states have no classes


@pytest.mark.parametrize("scale", [1e-30, 1e-6, 1.0, 1e30])
def test_fidelity_cosine_does_not_depend_on_the_outputs_scale(scale):
    """A randomly initialized Hugging Face MobileNetV2 gives logits of about 1e-24: torch's
    cosine_similarity clamps the norms' product at 1e-8 and read them as 0.0000."""
    from fxlrd.cli import fidelity

    torch.manual_seed(0)
    y = torch.randn(4, 10)
    noisy = y + 0.1 * torch.randn(4, 10)
    expected = float(torch.nn.functional.cosine_similarity(y.double(), noisy.double(), dim=-1).mean())
    grads = []

    def model(out):
        return lambda x: grads.append(torch.is_grad_enabled()) or out * scale

    got = fidelity(model(y), model(noisy), [torch.zeros(1)])
    assert got["cosine"] == pytest.approx(expected, rel=1e-6)
    assert grads == [False, False]  # (held-out batches run without autograd)
    assert fidelity(lambda x: y * 0, lambda x: y * 0, [torch.zeros(1)])["cosine"] == 1.0  # both zero: the same


def test_fidelity_does_not_mask_decoder_outputs_with_the_encoder_s_padding():
    # an encoder-decoder's logits run over the decoder's tokens: the encoder's attention_mask left real ones out
    from fxlrd.cli import fidelity

    logits = torch.randn(2, 4, 5)
    flipped = logits.clone()
    flipped[1, 3] = -flipped[1, 3]  # a real decoder token where the encoder pads
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
             "decoder_input_ids": torch.zeros(2, 4, dtype=torch.long)}  # fmt: skip
    model = lambda out: (lambda **kwargs: {"logits": out})  # noqa: E731
    assert fidelity(model(logits), model(flipped), [batch])["top1_agreement"] == pytest.approx(7 / 8)


def test_encoder_decoder_directory_gives_its_decoder_the_same_tokens(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                                   vocab_size=100, decoder_start_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    code, out, err = _run(capsys, "compress", tmp_path / "t5", "--seq-len", 8, "--backend", "eager", "--repeats", 1)
    assert code == 0, err
    assert "T5ForConditionalGeneration" in out and "decoder.block.0" in out


def test_bench_searches_ranks_for_the_optimized_variant_only():
    from fxlrd.cli import _variant_config, build_parser

    args = build_parser().parse_args(["bench", "resnet50", "--latency", "eager"])
    configs = {v: _variant_config(args, v) for v in ("vanilla", "quantized", "optimized", "merged", "branched")}
    assert configs["optimized"].latency is not None and configs["optimized"].latency.backend == "eager"
    assert all(c.latency is None for v, c in configs.items() if v != "optimized")
    assert configs["vanilla"].rank_quantum == 1


# -- the user's files are never replaced; mistakes caught before the work ---------------------------
def _digest(path: Path) -> bytes:
    return path.read_bytes()


@pytest.mark.parametrize(
    "outputs, message",
    [
        (["--onnx", "{weights}"], r"--onnx .* would replace --weights"),
        (["--report", "{cal}"], r"--report .* would replace --calibration"),
        (["--onnx", "{tmp}/x.out", "--report", "{tmp}/x.out"], r"--onnx .* and --report .* would overwrite each other"),
        (["--save", "{tmp}/s", "--report", "{tmp}/s/r.json"], r"would overwrite each other"),
    ],
)
def test_an_output_that_would_replace_an_input_or_another_output_is_refused(tmp_path, capsys, factory, outputs, message):
    spec, weights, _ = factory
    cal = tmp_path / "cal.pt"
    torch.save(torch.randn(8, 3, 32, 32), cal)
    before = {p: _digest(p) for p in (weights, cal)}
    argv = [a.format(weights=weights, cal=cal, tmp=tmp_path) for a in outputs]
    code, _, err = _run(capsys, "compress", spec, "--weights", weights, "--input-shape", "2,3,32,32", "--repeats", "0",
                        "--calibration", cal, "--calibration-batches", "2", *argv)  # fmt: skip
    assert code == 2 and re.search(message, err), err
    assert all(_digest(p) == data for p, data in before.items())
    assert not (tmp_path / "x.out").exists()


def test_plan_json_onto_the_model_file_is_refused(tmp_path, capsys):
    model_file = tmp_path / "net.py"
    model_file.write_text(MODELS_PY)
    code, _, err = _run(capsys, "plan", f"{model_file}:mlp", "--input-shape", "2,16", "--json", model_file)
    assert code == 2 and "would replace the model's file" in err, err
    assert model_file.read_text() == MODELS_PY


def test_save_over_a_directory_that_is_no_save_is_refused_before_the_work(tmp_path, capsys, factory):
    spec, weights, _ = factory
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    code, _, err = _run(capsys, "compress", spec, "--weights", weights, "--input-shape", "2,3,32,32", "--repeats", "0",
                        "--onnx", tmp_path / "m.onnx", "--save", target, "--overwrite")  # fmt: skip
    assert code == 2 and "other content than an fxlrd saved model" in err, err
    assert not (tmp_path / "m.onnx").exists() and (target / "notes.txt").read_text() == "keep me"


def test_demo_writes_into_out_whatever_the_model_spec(tmp_path, capsys, monkeypatch):
    (tmp_path / "models").mkdir()
    model_file = tmp_path / "models" / "net.py"
    model_file.write_text(MODELS_PY)
    code, out, err = _run(capsys, "demo", "--model", f"{model_file}:mlp", "--input-shape", "2,16", "--repeats", "0",
                          "--out", tmp_path / "out", "-q")  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["net_mlp_lrd", "net_mlp_lrd.onnx", "net_mlp_report.json"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["net.py"]
    # --out a model directory: the message names --out (it named --onnx, which the user never gave)
    code, _, err = _run(capsys, "demo", "--model", tmp_path / "models", "--out", tmp_path / "models", "-q")
    assert code == 2 and "--out " in err and "would put the demo's files in the model's directory" in err, err
    assert "--onnx" not in err and sorted(p.name for p in (tmp_path / "models").iterdir()) == ["net.py"]


def test_a_model_file_imports_its_sibling_modules_and_defines_dataclasses(tmp_path, capsys):
    (tmp_path / "layers.py").write_text("from torch import nn\n\nclass Block(nn.Linear):\n    pass\n")
    (tmp_path / "net.py").write_text(textwrap.dedent(
        """
        from __future__ import annotations
        from dataclasses import dataclass
        from torch import nn
        from layers import Block

        @dataclass
        class Cfg:
            d: int = 16

        def make(c: Cfg = Cfg()):
            return nn.Sequential(Block(c.d, 32), nn.ReLU(), nn.Linear(32, 4))
        """
    ))  # fmt: skip
    code, out, err = _run(capsys, "plan", f"{tmp_path / 'net.py'}:make", "--input-shape", "2,16")
    assert code == 0, err


def test_a_half_precision_model_is_run_in_float32_with_a_note(tmp_path, capsys):
    model_file = tmp_path / "half.py"
    model_file.write_text(MODELS_PY + "\n\ndef half():\n    return mlp().to(torch.bfloat16)\n")
    code, out, err = _run(capsys, "compress", f"{model_file}:half", "--input-shape", "2,16", "--repeats", "2",
                          "--onnx", tmp_path / "h.onnx")  # fmt: skip
    assert code == 0, err
    assert "bfloat16 weights converted to float32" in out


@pytest.mark.parametrize("kind", ["state_dict", "scalar_rows", "latin1", "other_shape", "encoding"])
def test_calibration_files_of_the_wrong_kind_are_named(tmp_path, capsys, factory, kind):
    spec, weights, model = factory
    path = tmp_path / ("cal.txt" if kind == "latin1" else "cal.pt")
    if kind == "state_dict":
        torch.save(model.state_dict(), path)
    elif kind == "scalar_rows":
        torch.save(torch.randn(3), path)
    elif kind == "latin1":
        path.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    elif kind == "other_shape":
        torch.save(torch.randn(8, 3, 16), path)
    else:
        transformers = pytest.importorskip("transformers")
        torch.save(transformers.BatchEncoding({"input_ids": torch.ones(4, 8, dtype=torch.long)}), path)
    message = {"state_dict": "looks like a model's weights", "scalar_rows": "samples first", "latin1": "not UTF-8",
               "other_shape": "holds samples of shape", "encoding": "Python objects besides tensors"}[kind]  # fmt: skip
    if kind == "latin1":  # a text file needs a text model: use the tensor model's check on a text model's path
        assert "not UTF-8" in str(pytest.raises(fxlrd.cli.UsageError, fxlrd.cli._Inputs._text,
                                                types.SimpleNamespace(kind="text", source=types.SimpleNamespace(
                                                    tokenizer=object())), path, 4).value)  # fmt: skip
        return
    code, _, err = _run(capsys, "compress", spec, "--weights", weights, "--input-shape", "2,3,32,32", "--repeats", "0",
                        "--calibration", path)  # fmt: skip
    assert code == 2 and message in err and err.count("\n") == 1 and "\x1b" not in err, err


def test_calibration_batches_that_do_not_run_through_the_model_are_named_before_the_work(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     vocab_size=50, max_position_embeddings=16)  # fmt: skip
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    torch.save(torch.full((8, 8), 999), tmp_path / "cal.pt")  # token ids past the vocabulary
    code, _, err = _run(capsys, "compress", tmp_path / "bert", "--seq-len", "8", "--calibration", tmp_path / "cal.pt",
                        "--repeats", "0", "-q")  # fmt: skip
    assert code == 2 and "--calibration" in err and "do not run through the model" in err, err
    assert "input_ids=int64[1, 8]" in err


@pytest.mark.parametrize("kind", ["text", "torchscript"])
def test_weights_files_of_the_wrong_kind_are_named(tmp_path, capsys, factory, kind):
    spec, _, model = factory
    path = tmp_path / "w.pt"
    if kind == "text":
        path.write_text("not weights")
    else:
        torch.jit.script(nn_linear := torch.nn.Linear(2, 2)).save(str(path))
        del nn_linear
    code, _, err = _run(capsys, "compress", spec, "--weights", path, "--input-shape", "2,3,32,32", "--repeats", "0")
    expected = {"text": "is not a PyTorch (torch.save) or safetensors file", "torchscript": "TorchScript archive"}[kind]
    assert code == 2 and expected in err, err


def test_bench_plot_format_is_checked_first_and_a_bare_name_gets_png(tmp_path, capsys, factory):
    spec, weights, _ = factory
    base = ["bench", spec, "--weights", weights, "--input-shape", "2,3,32,32", "--repeats", "0", "--variants",
            "original,quantized"]  # fmt: skip
    code, _, err = _run(capsys, *base, "--plot", tmp_path / "p.txt", "--report", tmp_path / "b.json")
    assert code == 2 and ".txt is not an image format" in err and not (tmp_path / "b.json").exists(), err
    code, out, err = _run(capsys, *base, "--plot", tmp_path / "p")
    assert code == 0 and (tmp_path / "p.png").is_file() and f"plot written to {tmp_path / 'p.png'}" in out, err
    assert "not timed (--repeats 0)" in out


@pytest.mark.parametrize("command", ["compress", "plan"])
@pytest.mark.parametrize("option", [["--mlp", "narrow"], ["--sequential"]])
def test_data_fitting_options_without_calibration_name_the_cli_option(capsys, factory, command, option):
    spec, _, _ = factory
    code, _, err = _run(capsys, command, spec, "--input-shape", "2,3,32,32", *option)
    fix = "add --calibration PATH" if command == "compress" else "use fxlrd compress --calibration PATH"
    assert code == 2 and f"fits the layers on data: {fix}" in err, err


def test_plan_hides_the_options_that_fit_on_data_and_refuses_them(capsys, factory):
    """plan takes no --calibration: --help listed --sequential, --mlp and --sensitivity, which
    it always refused (the first two) or ignored (--sensitivity)."""
    spec, _, _ = factory
    help_text = build_parser()._subparsers._group_actions[0].choices["plan"].format_help()
    assert "--sequential" not in help_text and "--sensitivity" not in help_text and "--mlp" not in help_text
    code, _, err = _run(capsys, "plan", spec, "--input-shape", "2,3,32,32", "--sensitivity", "kl")
    assert code == 2 and "--sensitivity kl fits the layers on data: use fxlrd compress --calibration PATH" in err, err
    code, out, err = _run(capsys, "plan", spec, "--input-shape", "2,3,32,32")
    assert code == 0 and "conv3" in out, err


def test_a_multiple_choice_model_is_refused_with_the_way_out(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     vocab_size=50, max_position_embeddings=16)  # fmt: skip
    transformers.BertForMultipleChoice(config).save_pretrained(tmp_path / "mc")
    code, _, err = _run(capsys, "compress", tmp_path / "mc", "--seq-len", "8", "--repeats", "0", "-q")
    assert code == 2 and "multiple-choice model" in err and "fxlrd.transform" in err, err


def test_inspect_reads_a_report_whose_blocks_held_nothing_out(tmp_path, capsys):
    """Too few positions to hold any out: the errors are NaN, written as null; inspect read them as numbers."""
    model_file = tmp_path / "net.py"
    model_file.write_text(MODELS_PY)
    torch.save(torch.randn(4, 16), tmp_path / "cal.pt")
    code, _, err = _run(capsys, "compress", f"{model_file}:mlp", "--input-shape", "2,16", "--calibration",
                        tmp_path / "cal.pt", "--mlp", "narrow", "--reconstruct", "5", "--repeats", "0",
                        "--report", tmp_path / "r.json", "-q")  # fmt: skip
    assert code == 0, err
    blocks = json.loads((tmp_path / "r.json").read_text())["reconstructed"]
    assert any(b["held_out_before"] is None for b in blocks.values())
    code, out, err = _run(capsys, "inspect", tmp_path / "r.json")
    assert code == 0 and "too few positions to hold any out" in out, err


def test_siblings_option_fuses_the_layers_reading_one_input(capsys, factory):
    code, out, err = _run(capsys, "plan", "fxlrd_cli_models:qkv", "--input-shape", "8,16", "--quantum", 1,
                          "--siblings", "fuse")  # fmt: skip
    assert code == 0, err
    assert "q_k_v" in out and "1 groups of sibling linears fused" in out
    code, out, err = _run(capsys, "plan", "fxlrd_cli_models:qkv", "--input-shape", "8,16", "--quantum", 1)
    assert code == 0 and "q_k_v" not in out
    code, out, err = _run(capsys, "plan", "fxlrd_cli_models:qkv", "--input-shape", "8,16", "--quantum", 1, "--siblings", "q,k")
    assert code == 0 and "q_k " in out and "q_k_v" not in out


def test_experts_option_factorizes_or_keeps_stacked_experts(capsys, factory):
    code, out, err = _run(capsys, "plan", "fxlrd_cli_models:moe", "--input-shape", "8,16", "--quantum", 1)
    assert code == 0, err
    assert "1 stacked expert weights, not in the rows above (1 factorized per expert" in out and "up  4x32x16  rank 5," in out
    code, out, err = _run(capsys, "plan", "fxlrd_cli_models:moe", "--input-shape", "8,16", "--quantum", 1,
                          "--experts", "keep")  # fmt: skip
    assert code == 0 and "up  4x32x16  kept: experts='keep'" in out, err


class _MergeBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def test_moved_norms_keep_their_statistics_when_re_estimating_them_does_not_help():
    """compress re-estimated the norms an approximate merge moved on every run, which took a
    data-aware model 2–3× farther from the original: now only when it comes closer."""
    from fxlrd.cli import _recover_norms, fidelity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.ReLU(), _MergeBlock(48), _MergeBlock(48)).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
    cal = [torch.randn(4, 3, 16, 16) for _ in range(8)]
    gm = fxlrd.transform(model, fxlrd.LRDConfig(merge="approximate"), example_inputs=cal[0], calibration=cal)
    assert any(getattr(m, "fxlrd_moved", False) for m in gm.modules())
    before = fidelity(model, gm, cal)["relative_error"]
    names = _recover_norms(gm, model, cal)
    after = fidelity(model, gm, cal)["relative_error"]
    assert after <= before and (names == []) == (after == before)
    assert after == before  # here re-estimating alone makes it worse (0.12 → 0.37), so nothing changed


# -- a failed run leaves the user's files as they were; timing falls back when onnxruntime cannot -----
@pytest.mark.parametrize("failure", ["timing", "save"])
def test_a_failed_compress_leaves_every_output_as_it_was(tmp_path, capsys, factory, monkeypatch, failure):
    """compress moved --onnx into place and wrote --save before timing: a run that then failed
    (exit 1) had replaced the user's files. Now every output is written beside its destination
    and moved into place only once the whole run succeeded."""
    import fxlrd.io

    save, onnx, report = tmp_path / "s", tmp_path / "m.onnx", tmp_path / "r.json"
    base = ["compress", "fxlrd_cli_models:mlp", "--input-shape", "2,16", "-q"]
    code, _, err = _run(capsys, *base, "--repeats", 0, "--save", save)
    assert code == 0, err
    onnx.write_bytes(b"the user's onnx file")
    report.write_text("the user's report")
    files = [onnx, report, *sorted(save.iterdir())]
    before = {p: p.read_bytes() for p in files}
    entries = sorted(p.name for p in tmp_path.rglob("*"))
    if failure == "timing":
        def fail(*args, **kwargs):
            raise RuntimeError("timing broke")

        monkeypatch.setattr(fxlrd.cli, "time_models", fail)
    else:  # the earlier save cannot be moved aside
        move = fxlrd.io._move

        def fail(src, dst):
            if Path(src) == save:
                raise PermissionError(f"cannot rename {src}")
            move(src, dst)

        monkeypatch.setattr(fxlrd.io, "_move", fail)
    code, _, err = _run(capsys, *base, "--ratio", 3, "--repeats", 1, "--onnx", onnx, "--save", save, "--overwrite",
                        "--report", report)  # fmt: skip
    assert code == 1 and ("timing broke" if failure == "timing" else "cannot rename") in err, err
    assert {p: p.read_bytes() for p in files} == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == entries  # nothing staged is left behind


def test_onnxruntime_timing_falls_back_to_eager_when_the_original_cannot_be_exported(tmp_path, capsys, factory,
                                                                                      monkeypatch):
    """The default timing backend exports the original to ONNX; where torch.onnx cannot (T5), the
    run died with torch's message after its outputs were written. Now it times in eager torch,
    says so, and records it in the report."""
    import fxlrd.export

    export = fxlrd.export.export_onnx_file

    def fail(model, *args, **kwargs):
        if not hasattr(model, "fxlrd_plan"):  # the original, and its capture; the compressed one exports
            raise RuntimeError("torch.onnx cannot export this model")
        return export(model, *args, **kwargs)

    monkeypatch.setattr(fxlrd.export, "export_onnx_file", fail)
    report = tmp_path / "r.json"
    code, out, err = _run(capsys, "compress", "fxlrd_cli_models:mlp", "--input-shape", "2,16", "--repeats", 2,
                          "--onnx", tmp_path / "m.onnx", "--save", tmp_path / "s", "--report", report)  # fmt: skip
    assert code == 0, err
    latency = json.loads(report.read_text())["latency"]
    assert latency["backend"] == "eager" and latency["original"]["n"] == 2 and latency["speedup"] > 0
    assert "torch.onnx cannot export this model" in latency["fallback"] and "--backend eager" in latency["fallback"]
    assert "timed in eager torch instead" in out and (tmp_path / "m.onnx").is_file() and (tmp_path / "s").is_dir()
    code, out, err = _run(capsys, "bench", "fxlrd_cli_models:mlp", "--input-shape", "2,16", "--repeats", 2,
                          "--variants", "original,quantized")  # fmt: skip
    assert code == 0, err
    assert "timed in eager torch instead" in out


# -- a factory model that takes token ids or several inputs ------------------------------------------
TOKEN_MODELS_PY = textwrap.dedent(
    """
    import torch
    from torch import nn


    class TokenNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 50)

        def forward(self, input_ids):
            return self.down(torch.relu(self.up(self.emb(input_ids))))


    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(8, 32)

        def forward(self, x, y):
            return self.a(x) + self.b(y)


    def tokens():
        torch.manual_seed(0)
        return TokenNet().eval()


    def two():
        torch.manual_seed(0)
        return TwoInputs().eval()
    """
)


@pytest.mark.parametrize("form", ["tensor", "named"])
def test_a_factory_model_taking_token_ids_compresses_from_an_integer_calibration_file(tmp_path, capsys, form):
    """The integer token ids of a calibration file were cast to float32 (and the user's file
    then blamed): they keep their dtype, and the example batch is the first calibration batch."""
    model_file = tmp_path / "tokmodels.py"
    model_file.write_text(TOKEN_MODELS_PY)
    ids = torch.randint(0, 50, (12, 10))
    torch.save(ids if form == "tensor" else {"input_ids": ids}, tmp_path / "ids.pt")
    report = tmp_path / "r.json"
    code, _, err = _run(capsys, "compress", f"{model_file}:tokens", "--input-shape", "2,10", "--calibration",
                        tmp_path / "ids.pt", "--calibration-batches", 4, "--repeats", 0, "--report", report, "-q")  # fmt: skip
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["calibration"]["batches"] == 4 and "int64[2, 10]" in data["model"]["inputs"]
    assert "held-out batches of" in data["fidelity"]["inputs"] and data["fidelity"]["relative_error"] < 1


def test_a_factory_model_random_float_inputs_cannot_feed_is_told_to_pass_calibration(tmp_path, capsys):
    """--input-shape cannot help a model that takes token ids or several inputs (random inputs
    are one float tensor): the error says what can, --calibration with real inputs."""
    model_file = tmp_path / "tokmodels.py"
    model_file.write_text(TOKEN_MODELS_PY)
    for factory in ("tokens", "two"):
        code, _, err = _run(capsys, "compress", f"{model_file}:{factory}", "--input-shape", "2,16", "--repeats", 0)
        assert code == 2 and "--calibration" in err and "pass --input-shape" not in err, err
        assert err.count("\n") == 1
    torch.save({"x": torch.randn(8, 16), "y": torch.randn(8, 8)}, tmp_path / "xy.pt")
    code, _, err = _run(capsys, "compress", f"{model_file}:two", "--batch", 2, "--calibration", tmp_path / "xy.pt",
                        "--calibration-batches", 3, "--repeats", 0, "-q")  # fmt: skip
    assert code == 0, err


# -- the layer count compares like with like ----------------------------------------------------------
LAYER_MODELS_PY = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Mixed(nn.Module):
        # 2 functional convs, attention (its packed in-projection runs as F.linear, and its
        # out-projection), a functional linear and a module linear: 6 conv/linear layers
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(32, 3, 3, 3) * 0.2)
            self.w2 = nn.Parameter(torch.randn(32, 32, 3, 3) * 0.1)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.fc_w = nn.Parameter(torch.randn(48, 32) * 0.1)
            self.out = nn.Linear(48, 10)

        def forward(self, x):
            x = F.relu(F.conv2d(F.relu(F.conv2d(x, self.w1, padding=1)), self.w2, padding=1))
            t = x.flatten(2).transpose(1, 2)
            t = self.attn(t, t, t, need_weights=False)[0].mean(1)
            return self.out(F.relu(F.linear(t, self.fc_w)))


    def mixed():
        torch.manual_seed(0)
        return Mixed().eval()
    """
)


def test_the_layer_count_counts_functional_layers_and_attention_on_both_sides(tmp_path, capsys):
    """The original's count took only nn.Linear/nn.ConvNd modules (0 for a functional model, no
    attention in-projection, no GPT-2 Conv1D) while the compressed side counted every site: now
    both sides count the same sites, so a run that decomposes nothing reports the same number."""
    model_file = tmp_path / "layermodels.py"
    model_file.write_text(LAYER_MODELS_PY)
    spec, base = f"{model_file}:mixed", ["--input-shape", "2,3,8,8", "--repeats", 0, "-q"]
    counts = {}
    for name, options in (("all", []), ("none", ["--exclude", "*"])):
        report = tmp_path / f"{name}.json"
        code, out, err = _run(capsys, "compress", spec, *base, *options, "--report", report)
        assert code == 0, err
        counts[name] = json.loads(report.read_text())["layers"]
        assert f"layers      {counts[name]['original']} -> {counts[name]['compressed']} conv/linear" in out
    assert counts["all"]["original"] == counts["none"]["original"] == 6
    assert counts["none"]["compressed"] == 6 and counts["all"]["compressed"] > 6
    report = tmp_path / "bench.json"
    code, _, err = _run(capsys, "bench", spec, *base, "--variants", "original,quantized", "--report", report)
    assert code == 0, err
    rows = json.loads(report.read_text())["variants"]
    assert rows["original"]["layers"] == 6 and rows["quantized"]["layers"] == counts["all"]["compressed"]


# -- image-folder preprocessing is documented and can be changed --------------------------------------
def test_image_folder_preprocessing_takes_the_model_s_mean_std_and_resize(tmp_path, capsys, factory):
    """A folder of images was resized 256→224-like, centre-cropped and normalized with ImageNet's
    mean/std whatever the model expects, and nothing said so or changed it: --help says so, and
    --image-mean/--image-std/--image-resize set them."""
    from PIL import Image

    from fxlrd.cli import _Inputs, build_parser

    spec, _, _ = factory
    folder = tmp_path / "white"
    folder.mkdir()
    Image.new("RGB", (40, 30), (255, 255, 255)).save(folder / "w.png")
    pixels = Image.new("RGB", (40, 30), (0, 0, 0))
    pixels.putpixel((0, 0), (255, 255, 255))  # a corner the crop keeps only without a resize margin
    pixels.save(folder / "corner.png")
    source = load_model(spec)

    def image(*options, name="w.png"):
        args = build_parser().parse_args(["compress", spec, "--input-shape", "1,3,30,40", "--calibration", str(folder),
                                          *map(str, options)])  # fmt: skip
        return _Inputs(source, args)._image(folder / name)

    imagenet = image()
    assert torch.allclose(imagenet[:, 0, 0], torch.tensor([2.2489, 2.4286, 2.6400]), atol=1e-3)
    assert torch.allclose(image("--image-mean", "0", "--image-std", "1"), torch.ones(3, 30, 40))
    half = image("--image-mean", "0.5,0.5,0.5", "--image-std", "0.5")
    assert torch.allclose(half, torch.ones(3, 30, 40))
    # --image-resize 30: the shorter side to 30 (the crop's size): the whole image, its corner kept
    assert image("--image-mean", "0", "--image-std", "1", "--image-resize", "30", name="corner.png")[:, 0, 0].tolist() \
        == [1.0, 1.0, 1.0]  # fmt: skip
    assert image("--image-mean", "0", "--image-std", "1", name="corner.png")[:, 0, 0].tolist() == [0.0, 0.0, 0.0]
    code, _, err = _run(capsys, "compress", spec, "--input-shape", "1,3,30,40", "--calibration", folder,
                        "--image-mean", "0.5,0.5", "--repeats", 0)  # fmt: skip
    assert code == 2 and "--image-mean" in err and "3 channels" in err, err
    code, _, err = _run(capsys, "compress", spec, "--input-shape", "1,3,30,40", "--image-std", "0", "--repeats", 0)
    assert code == 2 and "--image-std" in err, err
    code, _, err = _run(capsys, "compress", spec, "--input-shape", "1,3,30,40", "--image-mean", "0", "--repeats", 0)
    assert code == 2 and "applies to a --calibration folder of images" in err, err
    code, out, err = _run(capsys, "compress", "--help")
    assert "ImageNet" in " ".join(out.split()) and "--image-mean" in out


# -- errors name command-line remedies, not the Python API's ------------------------------------------
TWO_OUTPUTS_PY = textwrap.dedent(
    """
    import torch
    from torch import nn


    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h), h


    def make():
        torch.manual_seed(0)
        return TwoOutputs().eval()
    """
)


def test_errors_name_the_command_line_remedy_not_the_python_one(tmp_path, capsys, factory, monkeypatch):
    """--sensitivity kl on a model without logits said 'pass sensitivity=fn(...) or sensitivity=True',
    a failed int8 check 'QuantizeConfig(op_types=...)/QuantizeConfig(qtol=...)': options the
    command line does not have. They name its options now."""
    import fxlrd.export
    from fxlrd.errors import ExportMismatchError

    model_file = tmp_path / "twoout.py"
    model_file.write_text(TWO_OUTPUTS_PY)
    torch.save(torch.randn(8, 16), tmp_path / "cal.pt")
    code, _, err = _run(capsys, "compress", f"{model_file}:make", "--input-shape", "2,16", "--calibration",
                        tmp_path / "cal.pt", "--sensitivity", "kl", "--repeats", 0)  # fmt: skip
    assert code == 2 and "--sensitivity output" in err and "sensitivity=True" not in err, err

    def too_far(*args, **kwargs):
        raise ExportMismatchError(
            "the int8 model is too far from PyTorch (tanh: relative error 0.735; qtol 0.25); m.onnx was not written. "
            "Exclude sensitive operators with QuantizeConfig(dynamic=True, op_types=...), or accept more with "
            "QuantizeConfig(qtol=...)"
        )

    monkeypatch.setattr(fxlrd.export, "export_onnx", too_far)
    code, _, err = _run(capsys, "compress", "fxlrd_cli_models:mlp", "--input-shape", "2,16", "--repeats", 0,
                        "--onnx", tmp_path / "m.onnx", "--int8", "dynamic")  # fmt: skip
    assert code == 1 and "drop --int8" in err and "--int8 static" in err, err
    assert "accept more with QuantizeConfig(qtol=...)" not in err



def test_the_report_gives_the_batch_size_that_was_timed(tmp_path, capsys, factory):
    """A calibration file of 3 samples under --input-shape 8,16: the example (captured, counted,
    timed) is its batch of 3, while the report and summary said batch 8."""
    torch.save(torch.randn(3, 16), tmp_path / "cal3.pt")
    report = tmp_path / "r.json"
    code, out, err = _run(capsys, "compress", "fxlrd_cli_models:mlp", "--input-shape", "8,16", "--calibration",
                          tmp_path / "cal3.pt", "--repeats", 2, "--backend", "eager", "--threads", 1, "--report", report)
    assert code == 0, err
    assert json.loads(report.read_text())["latency"]["batch"] == 3
    assert "eager, batch 3," in out


# -- mutation audit 3: what the report and summary say, and how calibration files are cut -----------------
def _fixed_times(medians):
    """A stand-in for `time_models` that reports the given median seconds per model (min = max = median)."""

    def time_models(models, batch, **kwargs):
        return {name: {"median": medians[name], "min": medians[name], "max": medians[name], "n": kwargs["repeats"]}
                for name in models}  # fmt: skip

    return time_models


def test_compress_report_ratios_are_original_over_compressed_and_name_the_user_s_model(tmp_path, capsys, factory,
                                                                                      monkeypatch):
    """The speed-up is the original's time over the compressed model's (4 ms / 2 ms: 2x, not 0.5x; the int8
    file's 1 ms: 4x), the
    parameter ratio the original's count over the compressed one's, and the model's class the user's
    model (not the GraphModule that was built from it)."""
    spec, _, reference = factory
    monkeypatch.setattr(fxlrd.cli, "time_models", _fixed_times({"original": 4e-3, "compressed": 2e-3, "int8": 1e-3}))
    report_path = tmp_path / "r.json"
    code, out, err = _run(capsys, "compress", spec, "--input-shape", "1,3,16,16", "--quantum", 1, "--repeats", 2,
                          "--eval-batches", 1, "--onnx", tmp_path / "m.onnx", "--int8", "dynamic",
                          "--report", report_path)  # fmt: skip
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["latency"]["speedup"] == pytest.approx(2.0) and report["latency"]["speedup_int8"] == pytest.approx(4.0)
    assert "speed-up   2.00x" in out and "int8 4.00x" in out
    params = report["params"]
    assert params["original"] == sum(p.numel() for p in reference.parameters())
    assert params["ratio"] == pytest.approx(params["original"] / params["compressed"]) and params["ratio"] > 1
    assert report["model"]["class"] == "SmallNet" and "(SmallNet, factory" in out


def test_bench_speedup_and_mac_ratio_are_the_baseline_s_over_the_variant_s(tmp_path, capsys, factory, monkeypatch):
    spec, _, _ = factory
    monkeypatch.setattr(fxlrd.cli, "time_models", _fixed_times({"original": 6e-3, "quantized": 2e-3}))
    report_path = tmp_path / "b.json"
    code, out, err = _run(capsys, "bench", spec, "--input-shape", "1,3,16,16", "--variants", "original,quantized",
                          "--repeats", 2, "--eval-batches", 1, "--report", report_path)  # fmt: skip
    assert code == 0, err
    rows = json.loads(report_path.read_text())["variants"]
    assert rows["quantized"]["speedup"] == pytest.approx(3.0) and rows["original"]["speedup"] == pytest.approx(1.0)
    assert rows["quantized"]["mac_ratio"] == pytest.approx(rows["original"]["macs"] / rows["quantized"]["macs"])
    assert rows["quantized"]["mac_ratio"] > 1
    assert rows["quantized"]["speedup_per_mac_ratio"] == pytest.approx(3.0 / rows["quantized"]["mac_ratio"])


def test_image_folder_default_resize_crops_an_eighth_margin(tmp_path, factory):
    """By default an image's shorter side goes to the input size / 0.875 (ImageNet's 256 for 224)
    before the centre crop: a 28-pixel input is cut from 32 pixels, a margin of 2 on each side."""
    from PIL import Image

    from fxlrd.cli import _Inputs, build_parser

    spec, _, _ = factory
    columns = torch.arange(64, dtype=torch.uint8).mul(4)  # pixel value 4·x: the column says where it came from
    pixels = columns.expand(64, 64).unsqueeze(-1).expand(64, 64, 3).contiguous().numpy()
    Image.fromarray(pixels).save(tmp_path / "ramp.png")
    args = build_parser().parse_args(["compress", spec, "--input-shape", "1,3,28,28", "--calibration", str(tmp_path),
                                      "--image-mean", "0", "--image-std", "1"])  # fmt: skip
    x = _Inputs(load_model(spec), args)._image(tmp_path / "ramp.png") * 255
    # resized 64 -> 32 (a column is the mean of two: 4·(2j + 0.5)), then columns 2..29 kept
    assert x[0, 0, 0].item() == pytest.approx(4 * (2 * 2 + 0.5), abs=2)
    assert x[0, 0, -1].item() == pytest.approx(4 * (2 * 29 + 0.5), abs=2)


def test_a_text_file_is_cut_into_batches_of_distinct_lines():
    """Lines go to batches of --batch in order, each line in one batch (none shared, so the
    held-out batches share no text with the calibration ones), at most ``limit`` batches."""
    from fxlrd.cli import _Inputs

    class Tokenizer:  # each text as one token, its number
        pad_token = "<pad>"

        def __call__(self, texts, max_length, **kwargs):
            ids = torch.tensor([[int(t.split()[-1])] + [0] * (max_length - 1) for t in texts])
            return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    inputs = types.SimpleNamespace(kind="text", batch=2, seq_len=3, source=types.SimpleNamespace(tokenizer=Tokenizer()),
                                   _decoder=lambda batch: batch, segments=lambda: False)  # fmt: skip
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lines.txt"
        path.write_text("".join(f"text {i}\n" for i in range(1, 8)))  # 7 lines: 3 batches of 2, one left over
        batches = _Inputs._text(inputs, path, 10)
        assert [b["input_ids"][:, 0].tolist() for b in batches] == [[1, 2], [3, 4], [5, 6]]
        assert [b["input_ids"][:, 0].tolist() for b in _Inputs._text(inputs, path, 2)] == [[1, 2], [3, 4]]


def test_bench_reports_the_batch_size_that_was_timed(tmp_path, capsys, factory):
    torch.save(torch.randn(3, 16), tmp_path / "cal3.pt")
    report = tmp_path / "b.json"
    code, _, err = _run(capsys, "bench", "fxlrd_cli_models:mlp", "--input-shape", "8,16", "--calibration",
                        tmp_path / "cal3.pt", "--variants", "original,quantized", "--repeats", 0, "--report", report)  # fmt: skip
    assert code == 0, err
    assert json.loads(report.read_text())["timing"]["batch"] == 3


def test_an_output_inside_the_model_s_directory_is_refused(tmp_path, capsys):
    """A Hugging Face model directory is an input: an output in it (its config.json) would replace the user's file."""
    model_dir = tmp_path / "bert"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    code, _, err = _run(capsys, "compress", model_dir, "--report", model_dir / "config.json")
    assert code == 2 and "would replace the model's directory" in err, err
    assert (model_dir / "config.json").read_text() == "{}"


@pytest.mark.parametrize("text, value", [("5M", 5_000_000), ("5m", 5_000_000), ("2k", 2000), ("1.5G", 1_500_000_000),
                                         ("120", 120), ("0.4", 0.4)])  # fmt: skip
def test_target_params_takes_counts_with_either_case_of_suffix_and_fractions(text, value):
    from fxlrd.cli import _target_params

    got = _target_params(text)
    assert got == value and type(got) is type(value)


def _parsed(*argv):
    from fxlrd.cli import build_parser

    return build_parser().parse_args([str(a) for a in argv])


def test_command_line_options_reach_the_config(factory):
    from fxlrd.cli import _config

    spec, _, _ = factory
    config = _config(_parsed("compress", spec, "--latency", "eager", "--threads", 3, "--timing-context", "neighbours"))
    assert config.latency.backend == "eager" and config.latency.threads == 3 and config.latency.context == "neighbours"
    assert config.latency.quantize is None
    config = _config(_parsed("compress", spec, "--latency", "onnxruntime", "--timing-int8", "dynamic"))
    assert config.latency.quantize == "int8-dynamic"
    cal = ("--calibration", "cal.pt")  # --sensitivity needs calibration data (the file is read later)
    config = _config(_parsed("compress", spec, *cal, "--sensitivity", "diagonal"))
    assert config.sensitivity is True and config.sensitivity_matrix == "diagonal"
    config = _config(_parsed("compress", spec, *cal, "--sensitivity", "kl"))
    assert config.sensitivity == "kl" and config.sensitivity_matrix == "full"
    assert _config(_parsed("compress", spec, *cal, "--sensitivity", "off")).sensitivity is False
    assert _config(_parsed("compress", spec)).sensitivity is True  # the default: every output


def test_bench_variants_are_the_ones_its_help_describes(factory):
    """vanilla: paper ranks (quantum 1), quantized: --quantum, optimized: ranks timed, merged:
    approximate merging, branched: 2 branches; none but optimized searches by latency."""
    from fxlrd.cli import _variant_config

    spec, _, _ = factory
    args = _parsed("bench", spec, "--quantum", 8, "--backend", "eager", "--threads", 2)
    configs = {v: _variant_config(args, v) for v in ("vanilla", "quantized", "optimized", "merged", "branched")}
    assert configs["vanilla"].rank_quantum == 1 and configs["quantized"].rank_quantum == 8
    assert configs["merged"].merge == "approximate" and configs["branched"].branches == 2
    assert configs["optimized"].latency.backend == "eager" and configs["optimized"].latency.threads == 2
    assert all(c.latency is None for v, c in configs.items() if v != "optimized")
    assert all(c.merge is None for v, c in configs.items() if v != "merged")


def test_a_checkpoint_dict_is_unwrapped_under_each_usual_key(tmp_path, factory):
    from fxlrd.cli import load_weights

    _, _, reference = factory
    for key in ("state_dict", "model_state_dict", "model"):
        path = tmp_path / f"{key}.pt"
        torch.save({key: reference.state_dict(), "epoch": torch.tensor(3)}, path)
        import fxlrd_cli_models

        model = fxlrd_cli_models.factory()
        load_weights(model, path)
        assert torch.equal(model.bn1.running_mean, reference.bn1.running_mean), key


def test_parsed_defaults_are_the_ones_the_help_states():
    """Every '(default N)' in a command's help is what the option is when left out."""
    from fxlrd.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    checked = 0
    for name, sub in commands.items():
        for action in sub._actions:
            m = re.search(r"\(default:? ([0-9.e-]+)[;)]", action.help or "")
            # --batch: the model's own when left out; --ratio: None, so that one given beside --target-params is refused
            if m and action.option_strings and action.dest not in ("batch", "ratio"):
                assert action.default == pytest.approx(float(m.group(1))), (name, action.option_strings)
                checked += 1
    assert checked >= 15
    args = parser.parse_args(["compress", "m"])
    assert (args.eval_batches, args.calibration_batches, args.seq_len, args.repeats) == (4, 16, None, 20)  # 128 or fewer
    assert parser.parse_args(["demo"]).repeats == 30


@pytest.mark.parametrize("capture, other", [("fx", "export"), ("export", "fx")])
def test_a_capture_failure_names_the_other_capture_option(capsys, factory, monkeypatch, capture, other):
    import fxlrd.api
    from fxlrd.errors import CaptureError

    def fail(*args, **kwargs):
        raise CaptureError("the model could not be captured")

    monkeypatch.setattr(fxlrd.api, "transform", fail)
    code, _, err = _run(capsys, "compress", "fxlrd_cli_models:mlp", "--input-shape", "2,16", "--repeats", 0,
                        "--capture", capture)  # fmt: skip
    assert code == 1 and f"(on the command line: --capture {other})" in err, err


def test_fidelity_cosine_is_per_sample():
    """Each sample's output scaled by its own positive factor points the same way: cosine 1."""
    from fxlrd.cli import fidelity

    x = torch.randn(3, 8)
    scaled = fidelity(lambda t: t, lambda t: t * torch.tensor([[1.0], [3.0], [0.5]]), [x])
    assert scaled["cosine"] == pytest.approx(1.0) and scaled["relative_error"] > 0.1
    flipped = fidelity(lambda t: t, lambda t: t * torch.tensor([[1.0], [-1.0], [1.0]]), [x])
    assert flipped["cosine"] == pytest.approx(1 / 3)


# -- found by the CLI user-journey audit ----------------------------------------------------------
MAKE = "from torch import nn\ndef make():\n    return nn.Linear(4, 4)\n"


@pytest.mark.parametrize("source, where", [
    ("import sys\nsys.exit(0)\n" + MAKE, "importing"),  # a script's top-level exit: not the command's success
    ("import argparse\nargparse.ArgumentParser().parse_args()\n" + MAKE, "importing"),  # parsing fxlrd's argv
    ("import sys\ndef make():\n    sys.exit(3)\n", "calling"),
])
def test_a_model_file_that_exits_is_a_failure_not_the_commands_exit(tmp_path, capsys, monkeypatch, source, where):
    (tmp_path / "script_net.py").write_text(source)
    out_dir = tmp_path / "out"
    argv = ["compress", f"{tmp_path / 'script_net.py'}:make", "--input-shape", "1,4", "--repeats", 0, "--save", out_dir]
    monkeypatch.setattr(sys, "argv", ["fxlrd", *map(str, argv)])  # what a script parsing its argv sees from the command
    code, _, err = _run(capsys, *argv)
    assert code == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("fxlrd: error: ") and where in line and "SystemExit" in line, err
    assert not out_dir.exists()
    sys.modules.pop("script_net", None)


@pytest.mark.parametrize("named", [False, True])
def test_an_empty_calibration_tensor_file_is_refused(tmp_path, capsys, named):
    (tmp_path / "net0.py").write_text("from torch import nn\ndef make():\n    return nn.Sequential(nn.Linear(8, 16), "
                                      "nn.ReLU(), nn.Linear(16, 4))\n")  # fmt: skip
    empty = torch.zeros(0, 8)
    torch.save({"input": empty} if not named else {"x": empty, "y": torch.zeros(0, 8)}, tmp_path / "cal.pt")
    code, out, err = _run(capsys, "compress", f"{tmp_path / 'net0.py'}:make", "--input-shape", "1,8", "--repeats", 0,
                          "--calibration", tmp_path / "cal.pt")  # fmt: skip
    assert code == 2 and "holds no samples" in err and "Traceback" not in err, (out, err)
    sys.modules.pop("net0", None)


def test_a_model_neither_capture_takes_fails_in_one_line_without_a_wrong_capture_hint(tmp_path, capfd):
    """Under --capture auto both captures were tried: no '--capture export' hint; and torch.export's partial
    graph (printed to stderr, twice per attempt) stays off the terminal."""
    (tmp_path / "branchy.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
            def forward(self, x):
                h = self.a(x)
                if h.sum() > 0:
                    return self.b(h)
                return h
        def make():
            return Branchy()
        """))
    code = main(["compress", f"{tmp_path / 'branchy.py'}:make", "--input-shape", "2,16", "--repeats", "0", "-q"])
    err = capfd.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fxlrd: error: fxlrd could not capture Branchy"), err
    assert "--capture export" not in err and "def forward" not in err
    sys.modules.pop("branchy", None)


def test_a_model_without_weights_is_made_the_same_every_run(tmp_path, capsys):
    """A factory's own random init is seeded (--seed): the same command measures the same model every run."""
    (tmp_path / "randnet.py").write_text("from torch import nn\ndef make():\n"
                                         "    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))\n")
    reports = []
    for run in range(2):
        torch.manual_seed(run)  # whatever the process did before
        code, out, err = _run(capsys, "compress", f"{tmp_path / 'randnet.py'}:make", "--input-shape", "1,32",
                              "--repeats", 0, "--report", tmp_path / f"r{run}.json")  # fmt: skip
        assert code == 0, err
        reports.append(json.loads((tmp_path / f"r{run}.json").read_text())["fidelity"])
        sys.modules.pop("randnet", None)
    assert reports[0] == reports[1]


def test_a_text_models_tensor_calibration_without_token_type_ids_is_one_segment(tmp_path, capsys):
    """Random text batches carry token_type_ids when the model and its tokenizer take them; a
    calibration file of input_ids alone (or named tensors without them) then failed: 'inputs
    ['token_type_ids'] were given at capture and are missing from calibration batch 0'."""
    model_dir = _tiny_bert(tmp_path)
    ids = torch.randint(5, 100, (8, 16))
    torch.save(ids, tmp_path / "ids.pt")
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "named.pt")
    for name in ("ids.pt", "named.pt"):
        code, out, err = _run(capsys, "compress", model_dir, "--seq-len", 16, "--batch", 2, "--calibration",
                              tmp_path / name, "--calibration-batches", 2, "--eval-batches", 1, "--repeats", 0,
                              "--backend", "eager")  # fmt: skip
        assert code == 0, err


def test_the_default_sequence_fits_the_models_position_table():
    """128 tokens, or the model's longest: a RoBERTa-like model's position ids start after its
    padding token, so 64 positions take 62 tokens (64 failed with an index error)."""
    transformers = pytest.importorskip("transformers")
    from fxlrd.cli import _default_seq_len

    small = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 50}
    assert _default_seq_len(transformers.BertModel(transformers.BertConfig(**small, max_position_embeddings=64))) == 64
    assert _default_seq_len(transformers.RobertaModel(transformers.RobertaConfig(**small, max_position_embeddings=64))) == 62
    assert _default_seq_len(transformers.BertModel(transformers.BertConfig(**small))) == 128  # 512 positions
    assert _default_seq_len(nn.Linear(2, 2)) == 128


def test_compress_a_llama_directory_narrows_its_gated_mlps_under_a_size_budget(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaModel(config)
    model.save_pretrained(tmp_path / "llama")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (24, 16), generator=g)
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "tokens.pt")
    budget = int(0.7 * fxlrd.count_params(model))
    code, out, err = _run(capsys, "compress", tmp_path / "llama", "--seq-len", 16, "--batch", 4, "--calibration",
                          tmp_path / "tokens.pt", "--mlp", "narrow", "--ratio", "1.5", "--target-params", budget,
                          "--repeats", 0, "--eval-batches", 1, "--save", tmp_path / "saved")  # fmt: skip
    assert code == 0, err
    assert "layers.0.mlp.up_proj" in out and "narrowed MLP block (96 -> 64 neurons)" in out
    loaded = fxlrd.load(transformers.AutoModel.from_pretrained(tmp_path / "llama"), tmp_path / "saved")
    assert [b["partner"] for b in loaded.fxlrd_plan.settings["narrowed"]] == [f"layers.{i}.mlp.up_proj" for i in range(2)]
    assert fxlrd.count_params(loaded) <= budget


def test_zoo_models_get_their_own_default_input(capsys):
    """A zoo model is planned at the input it takes without --input-shape: the DCGAN generator
    a latent vector (1×100×1×1, a tensor model), the others an image."""
    from fxlrd import zoo

    assert zoo.input_shape("dcgan_generator") == (1, 100, 1, 1) and zoo.input_shape("unet") == (1, 3, 224, 224)
    code, out, err = _run(capsys, "plan", "dcgan_generator", "-q")
    assert code == 0, err
    assert "ConvTranspose2d" in out and "100->512" in out
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.input_shape("resnet18")
    code, out, err = _run(capsys, "plan", "dcgan_generator", "--size", 64, "-q")  # an image size for a latent
    assert code != 0 and "--size is for image models; dcgan_generator takes 1x100x1x1 tensors" in err
