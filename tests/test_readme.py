"""README.md's Python examples run as written.

Each block is found by the heading of its section (the first ```python fence after it), so a
reworded paragraph does not lose it; a renamed heading fails loudly here.
"""

import re
from pathlib import Path

import pytest
import torch

import fxlrd
from fxlrd import LRDConfig, zoo

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str) -> str:
    """The first ```python block after the line ``heading`` in README.md."""
    text = README.read_text(encoding="utf-8")
    start = text.find("\n" + heading + "\n")
    assert start >= 0, f"README.md has no heading {heading!r}"
    match = re.compile(r"^```python\n(.*?)^```$", re.S | re.M).search(text, start)
    assert match, f"README.md has no python block after {heading!r}"
    return match.group(1)


def code_lines(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.slow
def test_readme_ten_lines(tmp_path, monkeypatch):
    block = readme_block("## In ten lines")
    assert len(code_lines(block)) <= 10, "the 'In ten lines' example grew past ten lines of code"
    transformed = []
    transform = fxlrd.transform

    def recording(*args, **kwargs):  # the block rebinds gm: keep the transformed model to compare
        transformed.append(transform(*args, **kwargs))
        return transformed[-1]

    monkeypatch.setattr(fxlrd, "transform", recording)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(block, str(README) + ":In ten lines", "exec"), ns)

    saved = tmp_path / "build" / "resnet50-lrd"
    assert {"plan.json", "model.safetensors", "metadata.json"} <= {p.name for p in saved.iterdir()}
    onnx_file = tmp_path / "build" / "resnet50-lrd.onnx"
    assert onnx_file.is_file() and onnx_file.stat().st_size > 0
    (before,) = transformed
    loaded, x = ns["gm"], ns["x"]
    assert loaded is not before
    assert any(isinstance(m, fxlrd.Factorized) for m in loaded.modules())
    assert not loaded.training and not before.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), before(x), rtol=0, atol=0)
    # the paper's freezing was saved with the model
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in before.parameters()]
    assert not all(p.requires_grad for p in loaded.parameters())


@pytest.mark.slow
def test_readme_passes_example():
    """The passes example, on the model and input the ten-line example defines."""
    block = readme_block("## Saving, loading, int8, passes")
    model, x = zoo.resnet50().eval(), torch.randn(1, 3, 224, 224)
    ns = {"torch": torch, "fxlrd": fxlrd, "LRDConfig": LRDConfig, "model": model, "x": x}
    exec(compile(block, str(README) + ":passes", "exec"), ns)

    result = ns["result"]
    assert result.modified
    gm = result.graph_module
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in gm.modules()), "conv-BN folding did not run"
    assert not all(p.requires_grad for p in gm.parameters()), "FreezePass's flags were lost"
    # the exact merge and the folding keep the function of the decomposed model
    reference = fxlrd.transform(model, LRDConfig(ratio=2, merge="exact"), example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference(x), rtol=1e-4, atol=1e-4)


def test_readme_hugging_face_example(monkeypatch):
    """The Hugging Face example with its placeholders filled in: a tiny BertModel for the
    checkpoint, a batch of token ids for the tokenizer's output."""
    transformers = pytest.importorskip("transformers")
    from conftest import tiny_bert

    bert = tiny_bert()
    monkeypatch.setattr(transformers.BertModel, "from_pretrained", classmethod(lambda cls, path: bert))
    ids = torch.randint(1, 100, (2, 12))

    def tokenizer(texts, padding, return_tensors):
        assert padding is True and return_tensors == "pt"
        return transformers.BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    ns = {"fxlrd": fxlrd, "LRDConfig": LRDConfig, "tokenizer": tokenizer, "texts": ["a", "b"]}
    block = readme_block("## Your own model, and Hugging Face models")
    exec(compile(block, str(README) + ":Hugging Face", "exec"), ns)

    gm, batch = ns["gm"], ns["batch"]
    out = gm(**batch)
    assert isinstance(out, transformers.utils.ModelOutput)
    assert any(isinstance(m, fxlrd.Factorized) for m in gm.modules())
    with torch.no_grad():
        assert out.last_hidden_state.shape == bert(**batch).last_hidden_state.shape
