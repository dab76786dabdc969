"""The ``fxlrd`` command: compress a model, inspect a result, benchmark variants.

Run ``fxlrd --help`` or ``fxlrd COMMAND --help``; `main` is the entry point (also
``python -m fxlrd``). Exit status: 0 success; 1 the work failed (a file that cannot be read
or written, a model that cannot be captured, weights or a save that do not fit); 2 bad
usage (unknown option or model, malformed value). Errors are one line on stderr,
``fxlrd: error: ...``; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import fx, nn

from . import zoo
from ._files import atomic_path, write_text
from .errors import CaptureError, ConfigError, FxlrdError, FxlrdWarning

__all__ = ["main", "build_parser", "ModelSource", "load_model", "load_weights", "UsageError", "CommandError"]

Batch = Any  # one model input: a tensor (positional) or a dict of keyword tensors
REPORT_FORMAT = "fxlrd.report/1"
BENCH_FORMAT = "fxlrd.bench/1"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VARIANTS = ("original", "vanilla", "quantized", "optimized", "merged", "branched")
DEFAULT_VARIANTS = ("original", "vanilla", "quantized", "merged")
TIMING_BACKENDS = ("onnxruntime", "eager", "compile")
INT8_SCHEMES = ("static", "dynamic")  # --int8, --timing-int8
QUANTIZE_OF = {"static": "int8", "dynamic": "int8-dynamic"}  # a scheme's export_onnx(quantize=...)


class UsageError(Exception):
    """The command was called wrongly (exit status 2)."""


class CommandError(Exception):
    """The work failed (exit status 1)."""


# -- small helpers --------------------------------------------------------------------------------
class _Console:
    """Progress on stderr (tqdm bars and stage lines) when it is a terminal; ``--quiet`` silences it."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def step(self, text: str) -> None:
        if not self.quiet and sys.stderr.isatty():
            print(f"fxlrd: {text}", file=sys.stderr, flush=True)

    def bar(self, total: int | None, desc: str, unit: str = "it"):
        from tqdm.auto import tqdm

        disable = True if self.quiet else None  # None: only on a terminal
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=disable)


def _siblings(value: str) -> str | list[str]:
    """``--siblings``: ``separate``, ``fuse``, or comma-separated glob patterns."""
    return value if value in ("separate", "fuse") else [p.strip() for p in value.split(",") if p.strip()]


def _conv_methods() -> list[str]:
    """The registered methods that decompose a k×k convolution."""
    from .factorized import LayerSpec
    from .methods import get_method, methods

    spec = LayerSpec("conv", 8, 8, (3, 3), 1, True, (1, 1), (1, 1), (1, 1))
    return [m for m in methods() if not get_method(m).applies(spec)]


def _count(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for suffix, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {suffix}{unit}"
    return f"{n:g} {unit}".rstrip()


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _one_line(text: str) -> str:
    """``text`` on one line, without terminal colour codes (torch's messages carry some)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text))
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write strict JSON (no NaN: null) atomically (a temporary file beside ``path``, then a rename)."""
    text = json.dumps(_finite(data), indent=1, default=str, allow_nan=False)
    write_text(path, text + "\n")


@contextlib.contextmanager
def _staged_save(target: Path, overwrite: bool) -> Iterator[Path]:
    """A path beside ``target`` to `fxlrd.save` into; when the block ends without an error the
    save there is moved into place as `fxlrd.save` does it (an earlier save moved aside, and put
    back if the move fails), otherwise it is removed and ``target`` is left as it was."""
    from .io import _commit

    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.parent / f".{target.name}.staged-{uuid.uuid4().hex[:8]}"
    try:
        yield staged
        if staged.exists():
            _commit(staged, target, overwrite)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


@contextlib.contextmanager
def _outputs_staged(paths: Sequence[Path | None]) -> Iterator[contextlib.ExitStack]:
    """An `ExitStack` to stage the command's outputs on (`atomic_path`, `_staged_save`): they are
    moved into place when the block ends without an error, in the reverse order of staging (so
    stage the save last: its move is the one that can fail, and then nothing was replaced);
    on an error every staged file is removed, and so are the folders made for the outputs."""
    made = []  # the outermost folder each output's path lacked, and the folders made under it
    for path in paths:
        if path is None:
            continue
        missing = [a for a in path.parents if not a.exists()]
        if missing:
            made.append(missing)
    try:
        with contextlib.ExitStack() as stack:
            yield stack
    except BaseException:
        for folders in made:
            for folder in folders:  # deepest first; a folder holding anything stays
                try:
                    folder.rmdir()
                except OSError:
                    break
        raise


def _check_output(path: str | None, option: str, *, directory: bool = False, overwrite: bool = True) -> Path | None:
    """Fail before the long work if ``path`` cannot be written."""
    if path is None:
        return None
    p = Path(path)
    if p.exists():
        if directory and not overwrite:
            raise UsageError(f"{option} {p} already exists; add --overwrite to replace it or choose another directory")
        if directory and not p.is_dir():
            raise CommandError(f"cannot write {option} {p}: it exists and is not a directory")
        if directory:
            from .io import _check_target

            try:
                _check_target(p, overwrite)
            except FileExistsError as exc:
                raise UsageError(f"{option}: {exc}") from None
        if not directory and p.is_dir():
            raise CommandError(f"cannot write {option} {p}: it is a directory")
    ancestor = (Path(os.path.realpath(p)) if p.is_symlink() else p).parent  # a link's file is written where it points
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CommandError(f"cannot write {option} {p}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK):
        raise CommandError(f"cannot write {option} {p}: {ancestor} is not writable")
    try:  # os.access says yes to root everywhere; a file system may still refuse (read-only, /proc)
        fd, probe = tempfile.mkstemp(prefix=".fxlrd-probe.", dir=ancestor)
    except OSError as exc:
        raise CommandError(f"cannot write {option} {p}: {ancestor} refuses new files ({exc.strerror or exc})") from None
    os.close(fd)
    os.remove(probe)
    return p


def _input_paths(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """The user's files this command reads: the model's file or directory, weights, calibration."""
    out = []
    spec = getattr(args, "model", None) or ""
    file = spec.partition(":")[0]
    if file.endswith(".py"):
        out.append(("the model's file", Path(file)))
    elif spec and Path(spec).is_dir():
        out.append(("the model's directory", Path(spec)))
    for option in ("weights", "calibration"):
        if getattr(args, option, None):
            out.append((f"--{option}", Path(getattr(args, option))))
    return out


def _check_distinct(args: argparse.Namespace, outputs: Mapping[str, Path | None], directories: Sequence[str] = ()) -> None:
    """Refuse (before any work) an output that would replace one of the user's inputs (or a
    file in an input directory), two outputs at one path, and an output inside a directory
    output (``--save``), which replaces that directory. ``directories``: the directory outputs."""
    inputs = [(what, q.resolve()) for what, q in _input_paths(args)]
    given = [(option, path.resolve()) for option, path in outputs.items() if path is not None]
    for option, r in given:
        for what, q in inputs:
            if r == q or q in r.parents or (option in directories and r in q.parents):
                raise UsageError(f"{option} {outputs[option]} would replace {what} ({q}): choose another path")
    for i, (a, ra) in enumerate(given):
        for b, rb in given[i + 1 :]:
            if ra == rb or (a in directories and ra in rb.parents) or (b in directories and rb in ra.parents):
                raise UsageError(f"{a} {outputs[a]} and {b} {outputs[b]} would overwrite each other: choose separate paths")


# -- models ---------------------------------------------------------------------------------------
@dataclass
class ModelSource:
    """A model named on the command line and what is known about its inputs.

    Attributes:
        model: the module (eval mode).
        spec: what the user wrote.
        origin: ``"zoo"``, ``"factory"`` or ``"huggingface"``.
        kind: ``"vision"`` (image tensors), ``"text"`` (token ids) or ``"tensor"`` (any tensor input).
        input_shape: default input shape for vision/tensor models (batch first).
        tokenizer: a Hugging Face tokenizer, when the model directory has one.
        vocab_size: for text models: the range of random token ids.
        encoder_decoder: a sequence-to-sequence model (T5...): its decoder is given the
            encoder's tokens (``decoder_input_ids``), teacher-forced on the same text.
    """

    model: nn.Module
    spec: str
    origin: str
    kind: str = "vision"
    input_shape: tuple[int, ...] = (1, 3, 224, 224)
    tokenizer: Any = None
    vocab_size: int | None = None
    notes: list[str] = field(default_factory=list)
    encoder_decoder: bool = False


def _zoo_names() -> list[str]:
    return sorted(zoo._MODELS)


def _import_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"model {spec!r}: write a factory as package.module:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise CommandError(f"model {spec!r}: {path} does not exist")
            # as `python file.py` runs it: its folder first on the path (its sibling modules import),
            # and the module registered while it runs (dataclasses and pickling look it up there)
            folder = str(path.parent.resolve())
            if folder not in sys.path:
                sys.path.insert(0, folder)
            name = path.stem if path.stem not in sys.modules else f"fxlrd_user_{path.stem}"  # never shadow a module
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            module = importlib.import_module(module_name)
    except SystemExit as exc:  # a script's top-level sys.exit() or argparse: not the command's own exit
        raise CommandError(f"importing {module_name!r} exited (SystemExit: {exc.code!r}) instead of defining the "
                           "model; put the file's script code under if __name__ == '__main__':") from None
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise UsageError(f"model {spec!r}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from exc
        raise CommandError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"model {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise UsageError(f"model {spec!r}: {attr!r} is neither an nn.Module nor a function returning one")
        try:
            obj = obj()
        except SystemExit as exc:  # sys.exit() or argparse inside the factory: a failure, not the command's exit
            raise CommandError(f"calling {spec}() exited (SystemExit: {exc.code!r}) instead of returning a model") \
                from None
        except Exception as exc:  # noqa: BLE001  (the user's factory: report, do not crash)
            raise CommandError(f"calling {spec}() failed: {type(exc).__name__}: {_one_line(exc)}") from exc
    if not isinstance(obj, nn.Module):
        raise UsageError(f"model {spec!r}: the factory returned a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def _load_huggingface(directory: Path, quiet: bool) -> ModelSource:
    try:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoTokenizer
    except ImportError as exc:  # pragma: no cover
        raise CommandError(f"{directory} looks like a Hugging Face model; install transformers to load it") from exc
    transformers.logging.set_verbosity_error()  # its notes on unused weights etc. are not the user's business here
    hf_logging = transformers.utils.logging
    bars = hf_logging.is_progress_bar_enabled()
    if quiet or not sys.stderr.isatty():
        hf_logging.disable_progress_bar()  # "Loading weights" is a bar of its own (shown on a terminal only, as ours)
    try:
        # the class the checkpoint was saved from (its task head included), AutoModel without one
        architectures = getattr(AutoConfig.from_pretrained(str(directory), local_files_only=True), "architectures", None)
        arch = next((a for a in architectures or () if isinstance(getattr(transformers, a, None), type)), None)
        model = (getattr(transformers, arch) if arch else AutoModel).from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CommandError(
            f"cannot load the Hugging Face model in {directory}: {type(exc).__name__}: {_one_line(exc)}"
        ) from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if type(model).__name__.endswith("ForMultipleChoice"):
        raise UsageError(
            f"{directory} is a multiple-choice model ({type(model).__name__}): it takes token ids (N, choices, tokens), "
            "which the command line does not make; use the Python API, fxlrd.transform(model, "
            "example_inputs={'input_ids': ids}) with ids of that shape"
        )
    config = model.config
    source = ModelSource(model.eval(), str(directory), "huggingface")
    source.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    main_input = getattr(model, "main_input_name", "input_ids")
    if main_input == "input_ids":
        source.kind = "text"
        source.vocab_size = int(getattr(config, "vocab_size", 0) or 0) or None
        tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "vocab.json")
        if any((directory / name).is_file() for name in tokenizer_files):
            try:
                source.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
            except Exception as exc:  # noqa: BLE001  (a model without a usable tokenizer still works on token ids)
                source.notes.append(f"tokenizer not loaded ({type(exc).__name__}: {_one_line(exc)[:120]})")
    elif main_input == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        source.input_shape = (1, int(getattr(config, "num_channels", 3)), *map(int, size))
    else:
        source.kind = "tensor"
    return source


def load_model(spec: str, *, weights: str | None = None, quiet: bool = False) -> ModelSource:
    """The model named by ``spec``: a zoo name, ``package.module:factory`` or a Hugging Face directory.

    Args:
        spec: a `fxlrd.zoo` name (``resnet50``...), ``package.module:factory`` (imported and
            called; ``path/to/file.py:factory`` works too) or a local Hugging Face model
            directory (loaded with ``AutoModel.from_pretrained(dir, local_files_only=True)``,
            its tokenizer with it when present).
        weights: a state dict to load strictly (`load_weights`).
        quiet: keep transformers' logging quiet.

    Raises:
        UsageError: ``spec`` names no model.
        CommandError: the model or its weights cannot be loaded.
    """
    if spec in zoo._MODELS:
        shape = zoo.input_shape(spec)
        source = ModelSource(zoo.get(spec), spec, "zoo", "vision" if shape[1] == 3 else "tensor", shape,
                             notes=["random weights"] if weights is None else [])  # fmt: skip
    elif Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise UsageError(f"model {spec!r} is a directory without config.json: not a Hugging Face model directory")
        source = _load_huggingface(Path(spec), quiet)
    elif ":" in spec:
        notes = [f"weights as {spec.rpartition(':')[2]}() made them (no --weights)"] if weights is None else []
        model = _import_factory(spec)
        source = ModelSource(model, spec, "factory", kind="tensor", notes=notes)
        config = getattr(model, "config", None)
        if getattr(model, "main_input_name", None) == "input_ids" and config is not None:  # a transformers model: token ids
            source.kind = "text"
            source.vocab_size = int(getattr(config, "vocab_size", 0) or 0) or None
            source.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    else:
        raise UsageError(
            f"unknown model {spec!r}: give a zoo name ({', '.join(_zoo_names())}), a package.module:factory, "
            "or a Hugging Face model directory"
        )
    if weights is not None:
        load_weights(source.model, weights)
    half = sorted({str(p.dtype).removeprefix("torch.") for p in source.model.parameters()
                   if p.dtype in (torch.float16, torch.bfloat16)})  # fmt: skip
    if half:  # onnxruntime's CPU kernels, int8 and the timings here are float32
        source.model.float()
        source.notes.append(f"{' and '.join(half)} weights converted to float32 (the CPU backends run float32)")
    source.model.eval()
    return source


def _state_dict_from(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"--weights {path} does not hold a state dict (names to tensors) but a {type(obj).__name__}; "
                         "save model.state_dict() with torch.save")  # fmt: skip
    return dict(obj)


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") for n in archive.namelist())


def _unpicklable(path: Path, option: str) -> str:
    """What a file ``torch.load(weights_only=True)`` refused holds, and what to pass instead."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return f"{option} {path} is not a PyTorch (torch.save) or safetensors file"
    if _is_torchscript(path):
        return f"{option} {path} is a TorchScript archive; save model.state_dict() with torch.save and pass that"
    what = "a whole model or other Python objects" if option == "--weights" else "Python objects besides tensors"
    return (f"{option} {path} holds {what}, which fxlrd does not unpickle (torch.load with weights_only=True); "
            "save " + ("model.state_dict() with torch.save" if option == "--weights" else
                       "a plain dict of tensors (dict(encoding) for a tokenizer's output)") + ", or a .safetensors file")


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict into ``model`` with ``strict=True``.

    Args:
        model: the model.
        path: a ``.safetensors`` file, or a ``.pt``/``.pth``/``.bin`` file read with
            ``torch.load(weights_only=True)`` (a checkpoint dict with a ``state_dict`` or
            ``model`` entry is unwrapped).

    Raises:
        UsageError: an unknown file type.
        CommandError: the file is missing or unreadable, or does not fit the model.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise UsageError(f"--weights {p}: use a .safetensors, .pt or .pth file (got {suffix or 'no suffix'})")
    if p.is_dir():
        raise UsageError(f"--weights {p} is a directory; give the weights file in it")
    if not p.is_file():
        raise CommandError(f"weights file {p} does not exist")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, pickle.UnpicklingError) or _is_torchscript(p):  # torch's own message is long and coloured
            raise UsageError(_unpicklable(p, "--weights")) from exc
        hint = " (truncated or corrupt? write it again: " + ("safetensors.torch.save_file" if suffix == ".safetensors"
                                                             else "torch.save(model.state_dict(), path)") + ")"  # fmt: skip
        raise CommandError(f"cannot read weights file {p}: {type(exc).__name__}: {_one_line(exc)[:200]}{hint}") from exc
    state = _state_dict_from(state, p)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]  # fmt: skip
    if missing or unexpected or shapes:
        groups = (("missing", missing), ("unexpected", unexpected), ("of other shape", shapes))
        parts = [f"{len(items)} {what} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
                 for what, items in groups if items]  # fmt: skip
        raise CommandError(f"weights {p} do not fit {type(model).__name__}: keys " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


# -- inputs ---------------------------------------------------------------------------------------
def _parse_shape(text: str) -> tuple[int, ...]:
    parts = text.strip().split(",")
    if not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected sizes separated by commas, like 1,3,224,224; got {text!r}")
    shape = tuple(int(p) for p in parts)
    if any(v < 1 for v in shape):
        raise argparse.ArgumentTypeError(f"expected positive sizes separated by commas, like 1,3,224,224; got {text!r}")
    return shape


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _floats(text: str) -> tuple[float, ...]:
    """``0.5`` or ``0.485,0.456,0.406``: one value, or one per channel."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas (0.5 or 0.485,0.456,0.406), got "
                                         f"{text!r}") from None  # fmt: skip
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, like 1e-4; got {text!r}")
    return value


def _rank(text: str) -> int | tuple[int, int]:
    try:
        ranks = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rank like 64 or 32,48 (r1,r2), got {text!r}") from None
    if len(ranks) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected a rank like 64 or 32,48 (r1,r2), got {text!r}")
    return ranks[0] if len(ranks) == 1 else ranks


def _target_params(text: str) -> int | float:
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:].upper(), 1)
    try:
        value = float(text[:-1] if scale != 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a parameter count (5000000, 5M) or a fraction (0.4), got {text!r}"
        ) from None
    if 0 < value < 1:
        return value
    if value == 1:
        raise argparse.ArgumentTypeError("1 is neither a fraction of the model below 1 (0.5) nor a useful parameter "
                                         "count; give the budget as a fraction in (0, 1) or a count (5M)")  # fmt: skip
    if not math.isfinite(value) or value != int(value) or value < 2:
        raise argparse.ArgumentTypeError(
            f"expected a parameter count (an integer, 5000000, 5M) or a fraction of the model in (0, 1) (0.4), got {text!r}"
        )
    return int(value)


# Models whose position ids start after the padding token's (RoBERTa's create_position_ids_from_input_ids)
_PADDED_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text", "ibert",
                     "mpnet", "roberta-prelayernorm", "esm"}  # fmt: skip


def _default_seq_len(model: nn.Module) -> int:
    """128 tokens, or fewer when the model's config says it takes fewer (its position table,
    less the positions a RoBERTa-like model reserves up to its padding token)."""
    config = getattr(model, "config", None)
    longest = [getattr(config, key, None) for key in ("max_position_embeddings", "n_positions", "max_seq_len")]
    longest = [n for n in longest if isinstance(n, int) and n > 0]
    pad = getattr(config, "pad_token_id", None)
    if getattr(config, "model_type", None) in _PADDED_POSITIONS and isinstance(pad, int) and pad >= 0:
        longest = [n - pad - 1 for n in longest]
    return max(1, min([128] + longest))


class _Inputs:
    """Makes input batches for a model: random ones, and those read from calibration files."""

    def __init__(self, source: ModelSource, args: argparse.Namespace) -> None:
        self.source = source
        self.kind = source.kind
        self.args_calibration = getattr(args, "calibration", None)
        self.example: Batch | None = None  # the example batch, when it is a calibration batch (`_data`)
        self.image_mean = getattr(args, "image_mean", None)
        self.image_std = getattr(args, "image_std", None)
        self.image_resize = getattr(args, "image_resize", None)
        if self.image_std is not None and not all(v > 0 for v in self.image_std):
            raise UsageError(f"--image-std {','.join(map(str, self.image_std))}: the standard deviations must be > 0")
        given = [o for o, v in (("--image-mean", self.image_mean), ("--image-std", self.image_std),
                                ("--image-resize", self.image_resize)) if v is not None]  # fmt: skip
        if given and not (self.args_calibration and Path(self.args_calibration).is_dir()):
            raise UsageError(f"{given[0]} applies to a --calibration folder of images (the images are resized, "
                             "cropped and normalized with it); tensor files and random inputs are used as they are")  # fmt: skip
        batch = getattr(args, "batch", None)
        size = getattr(args, "size", None)
        if self.kind == "text":
            if args.input_shape is not None:
                raise UsageError("--input-shape is for tensor inputs; for a text model use --batch and --seq-len")
            if size is not None:
                raise UsageError("--size is for image models; for a text model use --seq-len")
            self.batch, self.seq_len = batch or 1, args.seq_len or _default_seq_len(source.model)
            self.shape = (self.batch, self.seq_len)
        else:
            if getattr(args, "seq_len", None) is not None:
                raise UsageError("--seq-len is for text models (token ids); this model takes tensors: use --input-shape")
            shape = args.input_shape
            if shape is not None and size is not None:
                raise UsageError(f"--size {size} and --input-shape {','.join(map(str, shape))} both set the input size: "
                                 "give one of them")  # fmt: skip
            if shape is None:
                shape = source.input_shape
                if size is not None:
                    if len(shape) != 4 or self.kind != "vision":
                        raise UsageError(f"--size is for image models; {source.spec} takes {'x'.join(map(str, shape))} "
                                         "tensors: give --input-shape")  # fmt: skip
                    shape = (shape[0], shape[1], size, size)
                if batch is not None:
                    shape = (batch, *shape[1:])
            elif batch is not None and batch != shape[0]:
                raise UsageError(f"--batch {batch} contradicts --input-shape {','.join(map(str, shape))} (batch first)")
            self.shape = tuple(shape)
            self.batch = self.shape[0]

    def segments(self) -> bool:
        """Whether text batches carry ``token_type_ids``: the model takes them and the tokenizer
        returns them; without a tokenizer, where the model's configuration has more than one
        token type (a BERT's: its tokenizer returns them; not GPT-2, whose token types are
        embeddings of its vocabulary, nor RoBERTa, whose tokenizer does not return them)."""
        tokenizer = self.source.tokenizer
        names = getattr(tokenizer, "model_input_names", None) or ()
        try:
            takes = "token_type_ids" in inspect.signature(self.source.model.forward).parameters
        except (TypeError, ValueError):
            takes = False
        if tokenizer is None:
            types = getattr(getattr(self.source.model, "config", None), "type_vocab_size", 0)
            return self.kind == "text" and takes and isinstance(types, int) and types > 1
        return self.kind == "text" and takes and "token_type_ids" in names

    def describe(self) -> str:
        if self.example is not None:
            return _describe_batch(self.example)
        if self.kind == "text":
            names = "input_ids, token_type_ids, attention_mask" if self.segments() else "input_ids, attention_mask"
            return f"{names} int64[{self.batch}, {self.seq_len}]"
        return f"float32[{', '.join(map(str, self.shape))}]"

    def random(self, seed: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        if self.kind == "text":
            vocab = self.source.vocab_size or 1000
            ids = torch.randint(min(5, vocab - 1), vocab, self.shape, generator=g)
            segments = {"token_type_ids": torch.zeros_like(ids)} if self.segments() else {}
            return self._decoder({"input_ids": ids, **segments, "attention_mask": torch.ones_like(ids)})
        return torch.randn(self.shape, generator=g)

    def _decoder(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An encoder-decoder model's batch: its decoder reads the same tokens."""
        if self.source.encoder_decoder and "decoder_input_ids" not in batch and "input_ids" in batch:
            batch = {**batch, "decoder_input_ids": batch["input_ids"]}
            if "attention_mask" in batch:
                batch["decoder_attention_mask"] = batch["attention_mask"]
        return batch

    # calibration files --------------------------------------------------------------------
    def read(self, path: Path, limit: int, console: _Console) -> list[Batch]:
        """Up to ``limit`` batches from a folder of images, a text file or a tensor file."""
        if not path.exists():
            raise CommandError(f"calibration data {path} does not exist")
        if path.is_dir():
            return self._images(path, limit, console)
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return self._text(path, limit)
        if suffix in (".pt", ".pth", ".safetensors"):
            return self._tensors(path, limit)
        raise UsageError(
            f"--calibration {path}: use a folder of images, a .txt file (one text a line) "
            "or a .pt/.safetensors tensor file"
        )

    def _images(self, folder: Path, limit: int, console: _Console) -> list[Batch]:
        if self.kind == "text" or len(self.shape) != 4 or self.shape[1] not in (1, 3):
            raise UsageError(f"--calibration {folder}: images need an image model, inputs (N, 1 or 3, H, W)")
        channels = self.shape[1]
        for option, values in (("--image-mean", self.image_mean), ("--image-std", self.image_std)):
            if values is not None and len(values) not in (1, channels):
                raise UsageError(f"{option} {','.join(map(str, values))}: give one value, or one for each of the "
                                 f"model's {channels} channels")  # fmt: skip
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise UsageError(f"--calibration {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files = files[: limit * self.batch]
        images = []
        with console.bar(len(files), "reading images", "img") as bar:
            for f in files:
                images.append(self._image(f))
                bar.update(1)
        starts = range(0, len(images) - self.batch + 1, self.batch)
        return [torch.stack(images[i : i + self.batch]) for i in starts] or [torch.stack(images)]

    def _image(self, path: Path) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        _, channels, h, w = self.shape
        try:
            with Image.open(path) as img:
                img = img.convert("RGB" if channels == 3 else "L")
                # the shorter side to --image-resize, by default like ImageNet's 256 for a 224 crop
                scale = (self.image_resize or max(h, w) / 0.875) / min(img.size)
                size = (max(w, round(img.size[0] * scale)), max(h, round(img.size[1] * scale)))
                img = img.resize(size, Image.BILINEAR)
                left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
                img = img.crop((left, top, left + w, top + h))
                array = np.asarray(img, dtype=np.float32) / 255.0
        except OSError as exc:
            raise CommandError(f"cannot read image {path}: {exc}") from exc
        x = torch.from_numpy(array.copy()).reshape(h, w, channels).permute(2, 0, 1)
        mean = self.image_mean or (IMAGENET_MEAN if channels == 3 else (0.449,))
        std = self.image_std or (IMAGENET_STD if channels == 3 else (0.226,))
        mean, std = (torch.tensor(v, dtype=torch.float32).expand(channels).reshape(-1, 1, 1) for v in (mean, std))
        return (x - mean) / std

    def _text(self, path: Path, limit: int) -> list[Batch]:
        if self.kind != "text":
            raise UsageError(f"--calibration {path}: a text file needs a Hugging Face text model")
        tokenizer = self.source.tokenizer
        if tokenizer is None:
            raise UsageError(
                f"--calibration {path}: the model has no tokenizer (a model directory can hold one); "
                "give token ids as a .pt/.safetensors tensor"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"--calibration {path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as "
                             "UTF-8") from None  # fmt: skip
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise UsageError(f"--calibration {path} has no text lines")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        lines = lines[: limit * self.batch]
        out = []
        for i in range(0, len(lines) - self.batch + 1, self.batch):
            enc = tokenizer(lines[i : i + self.batch], padding="max_length", truncation=True, max_length=self.seq_len,
                            return_tensors="pt")  # fmt: skip
            segments = {"token_type_ids": enc["token_type_ids"]} if self.segments() and "token_type_ids" in enc else {}
            out.append(self._decoder({"input_ids": enc["input_ids"], **segments, "attention_mask": enc["attention_mask"]}))
        if not out:
            raise UsageError(f"--calibration {path} has {len(lines)} lines, fewer than one batch of {self.batch}")
        return out

    def _tensors(self, path: Path, limit: int) -> list[Batch]:
        try:
            if path.suffix.lower() == ".safetensors":
                from safetensors.torch import load_file

                data: Any = load_file(str(path))
            else:
                data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UsageError(_unpicklable(path, "--calibration")) from None
        except Exception as exc:  # noqa: BLE001
            if _is_torchscript(path):
                raise UsageError(_unpicklable(path, "--calibration")) from None
            raise CommandError(
                f"cannot read calibration tensors {path}: {type(exc).__name__}: {_one_line(exc)[:200]}"
            ) from exc
        if isinstance(data, Mapping) and any(isinstance(k, str) and k.endswith((".weight", ".bias")) for k in data):
            raise UsageError(f"--calibration {path} looks like a model's weights (a state dict), not its inputs; "
                             "weights go to --weights")  # fmt: skip
        if isinstance(data, Mapping) and len(data) == 1:
            data = next(iter(data.values()))
        tensors = [data] if isinstance(data, torch.Tensor) else list(data.values()) if isinstance(data, Mapping) else []
        if any(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 0 for t in tensors):
            raise UsageError(f"--calibration {path} holds no samples (a tensor of length 0): save at least one "
                             "batch of the model's inputs")  # fmt: skip
        bad = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(t.isfinite().all())]
        if bad:
            raise UsageError(f"--calibration {path} holds NaN or infinite values ({int((~bad[0].isfinite()).sum())} of "
                             f"{bad[0].numel()} in one tensor): calibrate on real, finite inputs")  # fmt: skip
        if any(isinstance(t, torch.Tensor) and t.dim() < 2 for t in tensors):
            raise UsageError(f"--calibration {path}: every tensor must have the samples first (N, ...); found one of "
                             f"shape {[list(t.shape) for t in tensors if isinstance(t, torch.Tensor)]}")  # fmt: skip
        if self.kind == "text":
            ids = data if isinstance(data, torch.Tensor) else data.get("input_ids") if isinstance(data, Mapping) else None
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
                raise UsageError(f"--calibration {path}: a text model needs token ids, an integer tensor (N, tokens) "
                                 "alone or as input_ids")  # fmt: skip
        if isinstance(data, torch.Tensor):
            if self.kind == "text":
                data = self._decoder({"input_ids": data.long(), "attention_mask": torch.ones_like(data, dtype=torch.long)})
            else:
                if tuple(data.shape) == tuple(self.shape[1:]):
                    raise UsageError(f"--calibration {path} holds one sample without its batch dimension "
                                     f"({list(data.shape)}): save the samples stacked, (N, "
                                     f"{', '.join(map(str, data.shape))}), e.g. x.unsqueeze(0) for one")  # fmt: skip
                if tuple(data.shape[1:]) != tuple(self.shape[1:]):
                    raise UsageError(
                        f"--calibration {path} holds samples of shape {list(data.shape[1:])}, the model's inputs are "
                        f"{list(self.shape[1:])} per sample: pass --input-shape N,{','.join(map(str, data.shape[1:]))}"
                    )
                n = min(len(data) // self.batch, limit)
                data = data.float() if data.is_floating_point() else data  # token ids stay integers
                return [data[i * self.batch : (i + 1) * self.batch] for i in range(n)] or [data]
        if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise UsageError(f"--calibration {path} must hold one tensor (N, ...) or named tensors (input_ids, ...)")
        sizes = {len(v) for v in data.values()}
        if len(sizes) != 1:
            raise UsageError(f"--calibration {path}: the named tensors have different lengths {sorted(sizes)}")
        total = sizes.pop()
        n = min(total // self.batch, limit)
        batches = [{k: v[i * self.batch : (i + 1) * self.batch] for k, v in data.items()} for i in range(n)]
        return [self._decoder(b) for b in batches or [dict(data)]]


@dataclass
class _Data:
    example: Batch
    calibration: list[Batch] | None
    held_out: list[Batch]
    note: str


def _random_like(batch: Batch) -> bool:
    """Whether random inputs (`_Inputs.random`, one float tensor) have ``batch``'s form."""
    return isinstance(batch, torch.Tensor) and batch.is_floating_point()


def _check_calibration_path(args: argparse.Namespace) -> None:
    """A missing --calibration fails before the model is loaded (which can take a while)."""
    path = getattr(args, "calibration", None)
    if path and not Path(path).exists():
        raise CommandError(f"calibration data {path} does not exist")


def _data(args: argparse.Namespace, inputs: _Inputs, console: _Console) -> _Data:
    """The example batch, calibration batches (if asked), and held-out batches for fidelity."""
    example = inputs.random(args.seed)
    n_eval = args.eval_batches
    randoms = lambda: [inputs.random(args.seed + 1000 + i) for i in range(n_eval)]  # noqa: E731
    if not args.calibration:
        return _Data(example, None, randoms(), f"{_plural(n_eval, 'batch')} of random inputs")
    path = Path(args.calibration)
    n_cal = args.calibration_batches
    data = inputs.read(path, n_cal + n_eval, console)
    if len(data) > n_cal:
        cal, held = data[:n_cal], data[n_cal : n_cal + n_eval]
        note = f"{_plural(len(held), 'held-out batch')} of {path} (not used for calibration)"
    elif len(data) >= 2:
        cal, held = data[:-1], data[-1:]
        note = f"1 held-out batch of {path} (not used for calibration; it has {len(data)} batches in all)"
    elif _random_like(data[0]) or inputs.kind == "text":
        cal, held = data, randoms()
        note = f"{_plural(n_eval, 'batch')} of random inputs ({path} has only one batch, used for calibration)"
    else:  # random inputs (one float tensor) cannot stand in for token ids or several inputs
        cal, held = data, data
        note = f"the one batch of {path}, also used for calibration (it has no other to hold out)"
    if inputs.kind != "text":  # the model's own inputs: dtype (token ids) and structure (several inputs) kept
        example = inputs.example = cal[0]
    if isinstance(example, dict) and isinstance(cal[0], Mapping):  # a tokenizer's token_type_ids (zeros: one segment)
        for key, value in cal[0].items():
            if key == "token_type_ids" and key not in example and isinstance(value, torch.Tensor) \
                    and value.shape[1:] == example["input_ids"].shape[1:]:  # fmt: skip
                example[key] = torch.zeros(example["input_ids"].shape, dtype=value.dtype)
                held = [{**h, key: torch.zeros(h["input_ids"].shape, dtype=value.dtype)} if key not in h else h for h in held]
    if isinstance(example, Mapping) and "token_type_ids" in example:  # random batches carry them (`_Inputs.segments`):
        def one_segment(b: Batch) -> Batch:  # a file's batches without them are one segment, as the tokenizer says
            if isinstance(b, Mapping) and "token_type_ids" not in b and isinstance(b.get("input_ids"), torch.Tensor):
                return {**b, "token_type_ids": torch.zeros_like(b["input_ids"])}
            return b

        cal, held = [one_segment(b) for b in cal], [one_segment(b) for b in held]
    return _Data(example, cal, held, note)


# -- measuring ------------------------------------------------------------------------------------
def _describe_batch(batch: Batch) -> str:
    def one(t: torch.Tensor) -> str:
        return f"{str(t.dtype).removeprefix('torch.')}[{', '.join(map(str, t.shape))}]"

    if isinstance(batch, Mapping):
        return ", ".join(f"{k}={one(v)}" for k, v in batch.items() if isinstance(v, torch.Tensor))
    return one(batch) if isinstance(batch, torch.Tensor) else type(batch).__name__


def _batch_size(batch: Batch, inputs: "_Inputs") -> int:
    """The batch size of the batch that is timed (a calibration file's first batch may hold
    fewer samples than ``--input-shape`` asks for), ``inputs.batch`` when it has no tensor."""
    from .capture import _batch_size as batch_of, normalize_inputs

    size = batch_of(normalize_inputs(batch))
    return int(size) if size is not None else inputs.batch


def _call(model: nn.Module, batch: Batch) -> Any:
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


@torch.no_grad()
def _check_inputs(model: nn.Module, inputs: _Inputs, batch: Batch, calibration: Sequence[Batch] | None = None) -> None:
    """Run the model once on the example batch (and on the first calibration batch), so inputs
    that do not fit are a usage error named by their option, before any long work."""
    if calibration:
        try:
            _call(model, calibration[0])
        except Exception as exc:  # noqa: BLE001
            raise UsageError(
                f"--calibration {inputs.args_calibration}: its batches ({_describe_batch(calibration[0])}) do not run "
                f"through the model ({type(exc).__name__}: {_one_line(exc)[:200]}); give the inputs the model takes"
            ) from exc
    try:
        _call(model, batch)
    except Exception as exc:  # noqa: BLE001
        text = f"{type(exc).__name__}: {_one_line(exc)}"
        if inputs.kind == "text":
            hint = "pass --batch/--seq-len with the shape it expects"
        elif isinstance(exc, TypeError) and re.search(r"argument|positional", text):  # forward(x, y), keyword inputs
            hint = ("random inputs are one float tensor of --input-shape; for a model that takes several inputs, pass "
                    "--calibration with a .pt/.safetensors file of real inputs, named tensors (N, ...) for its "
                    "forward's arguments, and they are used as the example too")  # fmt: skip
        elif re.search(r"\b(Long|Int|integer|indices|scalar type)", text):  # an embedding given floats
            hint = ("random inputs are float; for a model that takes token ids (integers), pass --calibration with a "
                    ".pt/.safetensors file of real ones (an integer tensor (N, tokens), or named tensors for its "
                    "forward's arguments), and they are used as the example too")  # fmt: skip
        else:
            hint = ("pass --input-shape with the shape it expects (random float inputs of that shape are made; for a "
                    "model that takes token ids or several inputs, pass --calibration with real inputs instead)")  # fmt: skip
        raise UsageError(f"the model does not take inputs {inputs.describe()} ({text[:300]}); {hint}") from exc


def _main_output(out: Any) -> tuple[str, torch.Tensor]:
    """The output fidelity is measured on: the tensor itself, ``logits`` or ``last_hidden_state``
    of a Hugging Face output, else the first tensor."""
    if isinstance(out, torch.Tensor):
        return "output", out
    if isinstance(out, Mapping):
        for key in ("logits", "last_hidden_state"):
            if isinstance(out.get(key), torch.Tensor):
                return key, out[key]
        for key, value in out.items():
            if isinstance(value, torch.Tensor):
                return str(key), value
    if isinstance(out, (tuple, list)):
        for value in out:
            if isinstance(value, torch.Tensor):
                return "output[0]", value
    raise CommandError(f"the model's output ({type(out).__name__}) holds no tensor to compare")


class _OnnxCallable:
    """An ONNX file run by onnxruntime (CPU, no spinning), called like the model it came from;
    its outputs as tensors, in order (`fidelity` compares the first)."""

    def __init__(self, path: Path, threads: int | None):
        from .export import onnx_session

        self.session = onnx_session(path, threads=threads)

    def __call__(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        from .export import onnx_feed

        return [torch.from_numpy(y) for y in self.session.run(None, onnx_feed(self.session, (args, kwargs)))]


def _int8_weights(path: Path) -> dict[str, int]:
    """How many of the ONNX file's weight tensors (initializers of 2 or more dimensions) are
    stored in int8, of how many."""
    import onnx

    weights = [t for t in onnx.load(str(path)).graph.initializer if len(t.dims) >= 2]
    return {"int8": sum(t.data_type == onnx.TensorProto.INT8 for t in weights), "total": len(weights)}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the rows of ``a`` and ``b`` at any scale (torch's clamps the norms'
    product at 1e-8, which reads a model with outputs of 1e-5 as dissimilar); 1 where both are
    zero, 0 where one is."""
    a = a / a.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)  # (rows scaled to at most 1)
    b = b / b.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(b.dtype).tiny)
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    both = (na > 0) & (nb > 0)
    cos = (a * b).sum(-1) / torch.where(both, na * nb, torch.ones_like(na))
    return torch.where(both, cos, ((na == 0) & (nb == 0)).to(cos.dtype))


@torch.no_grad()
def fidelity(original: nn.Module, compressed: Callable[..., Any], batches: Sequence[Batch]) -> dict[str, Any]:
    """How close ``compressed``'s outputs are to ``original``'s on ``batches``.

    Returns relative error ``‖y' − y‖ / ‖y‖`` over all outputs (a text model's padding tokens
    left out: their outputs are unused), top-1 agreement for 2-D logits and per real token
    for 3-D ``logits`` (token classification, language models), and mean cosine
    similarity per sample (hidden states of a text model are first mean-pooled over the
    attention mask).
    """
    from .calibrate import TokenMasks

    num = den = 0.0
    agree = total = 0
    cosines: list[torch.Tensor] = []
    name = ""
    for batch in batches:
        name, y0 = _main_output(_call(original, batch))
        _, y1 = _main_output(_call(compressed, batch))
        y0, y1 = y0.double(), y1.double()
        # the real tokens of a per-token output (an encoder-decoder's decoder outputs follow its own mask)
        mask = TokenMasks(((), dict(batch)), {}).for_output(y0) if isinstance(batch, Mapping) else None
        real = mask if mask is not None and y0.dim() >= 3 and tuple(mask.shape) == tuple(y0.shape[:2]) else None
        real = real if real is not None and bool(real.any()) else None
        diff, ref = (y1 - y0, y0) if real is None else ((y1 - y0)[real], y0[real])  # padding tokens left out
        num, den = num + float((diff**2).sum()), den + float((ref**2).sum())
        if y0.dim() == 2 and y0.shape[-1] > 1 and real is None:
            agree += int((y0.argmax(-1) == y1.argmax(-1)).sum())
            total += y0.shape[0]
        elif y0.dim() == 3 and y0.shape[-1] > 1 and name == "logits":  # per-token classes (tagging, language models)
            same = y0.argmax(-1) == y1.argmax(-1)
            agree += int(same[real].sum()) if real is not None else int(same.sum())
            total += int(real.sum()) if real is not None else same.numel()
        if real is not None and y0.dim() == 3:
            w = mask.to(y0.dtype).unsqueeze(-1)
            p0, p1 = (y0 * w).sum(1) / w.sum(1).clamp_min(1), (y1 * w).sum(1) / w.sum(1).clamp_min(1)
            name = f"{name} (mean-pooled over the attention mask)"
        else:
            p0, p1 = y0.reshape(len(y0), -1), y1.reshape(len(y1), -1)
        cosines.append(_cosine(p0, p1))
    cos = torch.cat(cosines) if cosines else torch.zeros(0)
    return {
        "output": name,
        "relative_error": math.sqrt(num / den) if den > 0 else None,
        "top1_agreement": agree / total if total else None,
        "cosine": float(cos.mean()) if len(cos) else None,
        "batches": len(batches),
    }


@torch.no_grad()
def _macs(model: nn.Module, batch: Batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from .metrics import count_macs

    if isinstance(batch, torch.Tensor):
        return count_macs(model, (batch,))
    with FlopCounterMode(display=False) as counter:
        _call(model, batch)
    return counter.get_total_flops() // 2


def _layer_count(model: nn.Module, plan: Any = None) -> int:
    """Conv/linear layers, each counted once however often it runs. Of a graph: the conv/linear
    modules it calls (a decomposed layer's factors) and its functional layer sites (F.conv2d,
    F.linear, aten.addmm of a GPT-2 Conv1D). Of a model that is no graph: the sites of ``plan``
    (a plan made for it, which lists every site its capture found, decomposed or kept; fused
    siblings each count), so both sides count the same kinds of layer; without a plan, its
    conv/linear modules, GPT-2 Conv1D modules and attention in-projections."""
    layer_types = (nn.Linear, nn.modules.conv._ConvNd)
    if isinstance(model, fx.GraphModule):
        from .sites import find_sites

        called = {n.target for n in model.graph.nodes if n.op == "call_module"}
        modules = sum(isinstance(model.get_submodule(t), layer_types) for t in called)
        functional = sum(1 for s in find_sites(model).values() if s.kind == "function")
        return modules + functional
    if plan is not None:
        fused = [g for g in plan.settings.get("fused") or [] if g.get("name") in plan.layers]
        return len(plan.layers) + sum(len(g["members"]) - 1 for g in fused)
    return sum(isinstance(m, layer_types) or type(m).__name__ == "Conv1D"
               or (isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None) for m in model.modules())  # fmt: skip


class _TimingExportError(Exception):
    """onnxruntime timing could not export model ``name`` to ONNX (``cause``)."""

    def __init__(self, name: str, cause: BaseException) -> None:
        super().__init__(f"the {name} model cannot be exported to ONNX for timing: {type(cause).__name__}: "
                         f"{_one_line(cause)[:300]}")  # fmt: skip
        self.name, self.cause = name, cause


def _ort_runner(
    model: nn.Module, batch: Batch, threads: int, path: Path | None, tmp: Path, name: str
) -> Callable[[], object]:
    from .capture import normalize_inputs
    from .export import export_onnx_file, onnx_feed, onnx_session

    inputs = normalize_inputs(batch)
    if path is None:
        path = tmp / f"{name}.onnx"
        try:
            export_onnx_file(model.eval(), inputs, path)
        except Exception as exc:  # noqa: BLE001  (torch.onnx's own error types)
            if isinstance(model, torch.fx.GraphModule):
                raise _TimingExportError(name, exc) from exc
            # a model torch.onnx's own torch.export fails on (a transformers mixture of experts) can still
            # export as fxlrd's capture of it, the graph the compressed model is made from: the same function
            from .capture import capture

            try:
                export_onnx_file(capture(copy.deepcopy(model).eval(), batch, mode="export").gm, inputs, path)
            except Exception:  # noqa: BLE001  (neither: the first failure is the one to report)
                raise _TimingExportError(name, exc) from exc
    session = onnx_session(path, threads=threads)
    feed = onnx_feed(session, inputs)
    return lambda: session.run(None, feed)


def time_models(
    models: Mapping[str, nn.Module], batch: Batch, *, backend: str, threads: int, repeats: int, console: _Console,
    onnx_paths: Mapping[str, Path] | None = None,
) -> dict[str, dict[str, float]]:
    """Median/min/max seconds per run of each model on ``batch``, the models taking turns.

    ``onnxruntime``: CPU execution provider, ``threads`` intra-op threads, no spinning
    (`fxlrd.export.onnx_session`); ``eager``/``compile``: `fxlrd.latency.TorchTimer`.
    """
    from .capture import normalize_inputs
    from .latency import LatencyConfig, make_timer
    from .timing import median_times

    warmup = 3
    with tempfile.TemporaryDirectory(prefix="fxlrd-onnx-") as tmp:
        runners: dict[str, Callable[[], object]] = {}
        for name, model in models.items():
            console.step(f"preparing {name} for {backend} timing")
            if backend == "onnxruntime":
                runners[name] = _ort_runner(model, batch, threads, (onnx_paths or {}).get(name), Path(tmp), name)
            else:
                timer = make_timer(LatencyConfig(backend=backend, threads=threads, progress=False))
                runners[name] = timer.model_runner(model, normalize_inputs(batch))
        with console.bar(len(runners) * (repeats + warmup), f"timing ({backend}, taking turns)", "run") as bar:
            ticking = {n: (lambda fn=fn: (fn(), bar.update(1))) for n, fn in runners.items()}
            return median_times(ticking, repeats=repeats, warmup=warmup)


def _time(
    args: argparse.Namespace, models: Mapping[str, nn.Module], batch: Batch, console: _Console,
    onnx_paths: Mapping[str, Path] | None = None,
) -> tuple[dict[str, dict[str, float]], str, str | None]:
    """`time_models` on ``args.backend``: the times, the backend that timed them, and a note when
    that is not the one asked for. onnxruntime times an ONNX export of each model; where torch.onnx
    cannot export one (T5, for one), every model is timed in eager torch instead (timings of two
    backends do not compare), without the models only an ONNX file holds (``int8``)."""
    kw = dict(threads=args.threads, repeats=args.repeats, console=console)
    try:
        return time_models(models, batch, backend=args.backend, onnx_paths=onnx_paths, **kw), args.backend, None
    except _TimingExportError as exc:
        if args.backend != "onnxruntime":  # pragma: no cover  (only onnxruntime timing exports)
            raise
        note = (f"onnxruntime timing could not export the {exc.name} model to ONNX ({type(exc.cause).__name__}: "
                f"{_one_line(exc.cause)[:200]}); timed in eager torch instead (--backend eager chooses that, "
                "--repeats 0 skips timing)")  # fmt: skip
        console.step(note)
        models = {n: m for n, m in models.items() if n != "int8"}
        return time_models(models, batch, backend="eager", **kw), "eager", note


# -- configuration --------------------------------------------------------------------------------
def _config(args: argparse.Namespace, **overrides: Any):
    """The `LRDConfig` of the command-line options (``overrides`` win)."""
    from .config import LRDConfig
    from .latency import LatencyConfig

    if args.rank_rule == "fixed" and args.rank is None:
        raise UsageError("--rank-rule fixed needs --rank R (or R1,R2 for a conv's two Tucker ranks)")
    if args.rank_rule == "energy" and args.energy is None:
        raise UsageError("--rank-rule energy needs --energy E, the share of the spectrum kept, in (0, 1]")
    if args.rank is not None and args.rank_rule != "fixed":
        raise UsageError(f"--rank applies to --rank-rule fixed (this is --rank-rule {args.rank_rule}): add --rank-rule fixed")
    if args.energy is not None and args.rank_rule != "energy":
        raise UsageError(f"--energy applies to --rank-rule energy (this is --rank-rule {args.rank_rule}): add "
                         "--rank-rule energy")  # fmt: skip
    for option, wanted in (("--mlp narrow", getattr(args, "mlp", None) == "narrow"),
                           ("--sequential", getattr(args, "sequential", False)),
                           (f"--sensitivity {getattr(args, 'sensitivity', None)}",
                            getattr(args, "sensitivity", None) is not None)):  # fmt: skip
        if wanted and not getattr(args, "calibration", None):
            where = "add --calibration PATH" if "calibration" in vars(args) else "use fxlrd compress --calibration PATH"
            raise UsageError(f"{option} fits the layers on data: {where}")
    if args.ratio is not None and args.target_params is not None and getattr(args, "mlp", None) != "narrow":
        raise UsageError(f"--ratio {args.ratio:g} and --target-params both set the model's size: give one of them "
                         "(with --mlp narrow, --ratio narrows the MLP blocks and --target-params sizes the model)")  # fmt: skip
    latency = None
    target_speedup = getattr(args, "target_speedup", None)
    variants = getattr(args, "variants", None) or ()
    bench = "variants" in vars(args)  # (bench searches ranks for its optimized variant only)
    searching = "optimized" in variants if bench else args.latency or target_speedup
    timing_backend = args.latency or getattr(args, "backend", "onnxruntime")
    for option, value, needs in (("--timing-context", getattr(args, "timing_context", "layer"), "BACKEND"),
                                 ("--timing-int8", getattr(args, "timing_int8", None), "onnxruntime")):  # fmt: skip
        if value not in (None, "layer") and not searching:
            fix = "add optimized to --variants" if bench else f"add --latency {needs} (or --target-speedup)"
            raise UsageError(f"{option} {value} applies to the latency search: {fix}")
    timing_int8 = QUANTIZE_OF.get(getattr(args, "timing_int8", None))
    if timing_int8 and timing_backend != "onnxruntime":
        raise UsageError(f"--timing-int8 {args.timing_int8} times layers in onnxruntime's int8, not on {timing_backend}: "
                         "use --latency onnxruntime" + ("" if args.latency else " (or --backend onnxruntime)"))  # fmt: skip
    if args.latency or target_speedup:
        latency = LatencyConfig(backend=timing_backend,
                                threads=getattr(args, "threads", None), progress=not args.quiet,
                                context=getattr(args, "timing_context", "layer"), quantize=timing_int8)  # fmt: skip
    values: dict[str, Any] = {
        "ratio": 2.0 if args.ratio is None else args.ratio, "rank_rule": args.rank_rule, "rank": args.rank, "energy": args.energy,
        "rank_quantum": args.quantum, "beta": args.beta, "latency": latency, "target_speedup": target_speedup,
        "target_params": args.target_params, "merge": getattr(args, "merge", None),
        "branches": getattr(args, "branches", 1), "conv_method": args.conv_method,
        "include": args.include, "exclude": args.exclude or (),
        "allocation": getattr(args, "allocation", "uniform"), "sequential": getattr(args, "sequential", False),
        **_SENSITIVITY[getattr(args, "sensitivity", None) or "output"], "mlp": getattr(args, "mlp", "factorize"),
        "siblings": _siblings(getattr(args, "siblings", "separate")), "experts": getattr(args, "experts", "factorize"),
    }  # fmt: skip
    values.update(overrides)
    return LRDConfig(**values)


_SENSITIVITY = {  # --sensitivity: LRDConfig settings
    "output": {"sensitivity": True},
    "kl": {"sensitivity": "kl"},
    "diagonal": {"sensitivity": True, "sensitivity_matrix": "diagonal"},
    "off": {"sensitivity": False},
}


@contextlib.contextmanager
def _blas_single_thread() -> Iterator[None]:
    """numpy's OpenBLAS with one thread while decomposing.

    Its worker threads busy-wait: on a machine with as many cores as threads and anything
    else running, a 512×512 ``eigh`` (the SVD of every layer) took 3.9 s with 2 threads and
    0.05 s with 1. The matrices are too small to gain from more threads anyway.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover  (an optional speed-up)
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _recover_norms(gm: fx.GraphModule, model: nn.Module, batches: Sequence[Batch]) -> list[str]:
    """Re-estimate the norms an approximate merge moved (new norms, with empty statistics), and
    keep the new statistics only when they bring the outputs closer to ``model``'s on
    ``batches``: without fine-tuning, batch statistics under the new norm's unit scale and zero
    shift can take the model farther from the original (a data-aware transform most of all)."""
    from .recover import reestimate_norms

    moved = [m for m in gm.modules() if getattr(m, "fxlrd_moved", False)]
    if not moved or not batches or isinstance(batches[0], Mapping):
        return []
    kept = [{k: v.clone() for k, v in m._buffers.items() if v is not None} for m in moved]
    with torch.no_grad():
        before = fidelity(model, gm, batches)["relative_error"]
        names = reestimate_norms(gm, [b if isinstance(b, tuple) else (b,) for b in batches])
        after = fidelity(model, gm, batches)["relative_error"]
        if not after < before:
            for m, buffers in zip(moved, kept):
                for k, v in buffers.items():
                    m._buffers[k].copy_(v)
            return []
    return names


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    from .timing import environment

    return {**environment(), "timing_threads": args.threads}


# -- compress -------------------------------------------------------------------------------------
def _compress(args: argparse.Namespace, console: _Console) -> dict[str, Any]:
    """Everything `fxlrd compress` does, returning the report."""
    from .api import transform

    config = _config(args)  # before any long work: bad settings fail at once
    onnx_path = _check_output(args.onnx, "--onnx")
    int8 = getattr(args, "int8", None)
    if int8 and onnx_path is None:
        raise UsageError(f"--int8 {int8} quantizes the --onnx file: pass --onnx PATH as well")
    if int8 == "static" and not args.calibration:
        raise UsageError(
            "--int8 static fixes activation ranges on real data: pass --calibration (a folder of images, a .txt "
            "file or a tensor file), or use --int8 dynamic, which needs none"
        )
    reconstruct = getattr(args, "reconstruct", 0)
    if reconstruct and config.mlp != "narrow":
        raise UsageError(f"--reconstruct {reconstruct} refits narrowed MLP blocks: pass --mlp narrow as well")
    distill_steps = getattr(args, "distill", 0)
    if distill_steps and not args.calibration:
        raise UsageError(
            f"--distill {distill_steps} trains the compressed model to match the original on real inputs: pass "
            "--calibration (a folder of images, a .txt file or a tensor file)"
        )
    if args.overwrite and not args.save:
        raise UsageError("--overwrite replaces an existing --save directory: add --save DIR, or drop --overwrite")
    save_path = _check_output(args.save, "--save", directory=True, overwrite=args.overwrite)
    report_path = _check_output(args.report, "--report")
    _check_distinct(args, {"--onnx": onnx_path, "--save": save_path, "--report": report_path}, directories=["--save"])
    _check_calibration_path(args)
    console.step(f"loading {args.model}")
    torch.manual_seed(args.seed)  # a factory's or zoo model's own random weights: the same every run
    source = load_model(args.model, weights=args.weights, quiet=args.quiet)
    inputs = _Inputs(source, args)
    data = _data(args, inputs, console)
    model = source.model
    _check_inputs(model, inputs, data.example, data.calibration)
    console.step(f"compressing {type(model).__name__} (ratio {config.ratio:g}"
                 + (f", {len(data.calibration)} calibration batches" if data.calibration else "") + ")")  # fmt: skip
    t0 = time.perf_counter()
    with _blas_single_thread():
        gm = transform(model, config, example_inputs=data.example, capture=args.capture, calibration=data.calibration)
    transform_s = time.perf_counter() - t0
    recovered = _recover_norms(gm, model, data.calibration or [inputs.random(args.seed + 2000 + i) for i in range(4)])
    reconstructed = None
    if reconstruct:
        narrowed = gm.fxlrd_plan.settings.get("narrowed") or []
        if narrowed:
            from .recover import reconstruct_mlps

            console.step(f"training the {len(narrowed)} narrowed MLP blocks, one at a time ({reconstruct} steps each)")
            reconstructed = reconstruct_mlps(gm, model, data.calibration, steps=reconstruct, progress=not args.quiet)
        else:
            console.step("no MLP block was narrowed: nothing to reconstruct")
    distilled = None
    if distill_steps:
        from .recover import distill

        lr = args.distill_lr
        # an eighth of the calibration batches (at least one) held out for early stopping:
        # distillation on a few batches overfits them, and then the model keeps its best check
        n_val = max(1, len(data.calibration) // 8) if len(data.calibration) >= 2 else 0
        train, val = data.calibration[: len(data.calibration) - n_val], data.calibration[len(data.calibration) - n_val :]
        console.step(f"distilling to the original on {len(train)} calibration batches"
                     + (f", {n_val} held out for early stopping" if n_val else "")
                     + f" ({distill_steps} Adam steps from lr {lr:g}, cosine)")  # fmt: skip
        t0 = time.perf_counter()
        curve = distill(gm, model, train, steps=distill_steps, lr=lr, schedule="cosine", validation=val or None,
                        progress=not args.quiet)  # fmt: skip
        n = max(1, min(len(train), len(curve) // 2))  # one pass over the batches, first and last
        distilled = {"steps": distill_steps, "lr": lr, "schedule": "cosine", "batches": len(train),
                     "validation_batches": n_val, "loss_first": sum(curve[:n]) / n, "loss_last": sum(curve[-n:]) / n,
                     "seconds": time.perf_counter() - t0}  # fmt: skip
        if n_val:
            checks = dict(curve.validation)
            distilled.update(kept_step=curve.best_step, validation_start=checks[0],
                             validation_kept=checks[curve.best_step])  # fmt: skip
    console.step("measuring fidelity on held-out inputs")
    fid = fidelity(model, gm, data.held_out)
    fid["inputs"] = data.note
    # every output is written beside its destination and moved into place only when the whole run
    # succeeded: a run that fails (here, timing, the report) leaves the user's files as they were
    with _outputs_staged([onnx_path, save_path, report_path]) as staged:
        report_tmp = Path(staged.enter_context(atomic_path(report_path))) if report_path is not None else None
        onnx_tmp = Path(staged.enter_context(atomic_path(onnx_path))) if onnx_path is not None else None
        save_tmp = staged.enter_context(_staged_save(save_path, args.overwrite)) if save_path is not None else None
        report = _compress_outputs(args, console, config, source, inputs, data, model, gm, onnx_tmp, save_tmp)
        report.update(transform_s=transform_s, norms_reestimated=len(recovered), reconstructed=reconstructed,
                      distilled=distilled, fidelity=fid)  # fmt: skip
        files = {"onnx": onnx_path, "save": save_path, "report": report_path}
        report["files"] = {k: str(v) for k, v in files.items() if v is not None}
        if report_tmp is not None:
            _write_json(report_tmp, report)
    return report


def _compress_outputs(
    args: argparse.Namespace, console: _Console, config: Any, source: ModelSource, inputs: _Inputs, data: _Data,
    model: nn.Module, gm: fx.GraphModule, onnx_tmp: Path | None, save_tmp: Path | None,
) -> dict[str, Any]:
    """compress's outputs, written to their staged paths (``onnx_tmp``, ``save_tmp``), its timing,
    and the report of it all (`_compress` adds what it measured before)."""
    from .export import export_onnx
    from .io import save
    from .metrics import count_params

    int8 = getattr(args, "int8", None)
    params = {"original": count_params(model), "compressed": count_params(gm)}
    macs = {"original": _macs(model, data.example), "compressed": _macs(gm, data.example)}
    layers = {"original": _layer_count(model, gm.fxlrd_plan), "compressed": _layer_count(gm)}
    int8_report = None
    if onnx_tmp is not None:
        console.step(f"exporting {args.onnx}" + (f" in int8 ({int8})" if int8 else "") + " (checked against onnxruntime)")
        quantize = QUANTIZE_OF.get(int8)
        try:
            export_onnx(gm, data.example, onnx_tmp, quantize=quantize,
                        calibration=data.calibration if int8 == "static" else None)  # fmt: skip
        except Exception as exc:  # its message names the staged file: name the user's
            exc.args = tuple(a.replace(str(onnx_tmp), str(args.onnx)) if isinstance(a, str) else a for a in exc.args)
            raise
        if int8:
            console.step("measuring the int8 file's fidelity on held-out inputs")
            int8_report = {"scheme": int8, "weights": _int8_weights(onnx_tmp),
                           "fidelity": {**fidelity(model, _OnnxCallable(onnx_tmp, args.threads), data.held_out),
                                        "inputs": data.note}}  # fmt: skip
    if save_tmp is not None:
        console.step(f"saving {args.save}")
        save(gm, save_tmp)
    latency = None
    if args.repeats > 0:
        models, paths = {"original": model, "compressed": gm}, {}
        if onnx_tmp is not None and args.backend == "onnxruntime":
            if int8:  # the float model is exported afresh; the int8 file is timed as written
                models["int8"], paths["int8"] = gm, onnx_tmp
            else:
                paths["compressed"] = onnx_tmp
        times, backend, fallback = _time(args, models, data.example, console, onnx_paths=paths)
        latency = {"backend": backend, "threads": args.threads, "repeats": args.repeats, "batch": _batch_size(data.example, inputs),
                   **times, "speedup": times["original"]["median"] / times["compressed"]["median"]}  # fmt: skip
        if "int8" in times:
            latency["speedup_int8"] = times["original"]["median"] / times["int8"]["median"]
        if fallback:
            latency["fallback"] = fallback
    plan = gm.fxlrd_plan
    return {
        "format": REPORT_FORMAT,
        "command": ["fxlrd", *getattr(args, "argv", [])],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": _environment(args),
        "model": {"spec": args.model, "origin": source.origin, "class": type(model).__name__, "kind": source.kind,
                  "inputs": inputs.describe(), "notes": source.notes, "weights": args.weights},  # fmt: skip
        "capture": getattr(gm, "fxlrd_capture", None),
        "settings": config.to_dict(),
        "calibration": {"path": args.calibration, "batches": len(data.calibration or [])},
        "norms_reestimated": None,
        "reconstructed": None,
        "distilled": None,
        "transform_s": None,
        "layers": layers,
        "params": {**params, "ratio": _ratio(params["original"], params["compressed"])},
        "macs": {**macs, "ratio": _ratio(macs["original"], macs["compressed"])},
        "latency": latency,
        "fidelity": None,
        "int8": int8_report,
        "files": {},
        "plan_table": plan.table(),
        "plan": plan.to_dict(),
    }


_FILE_KINDS = {
    "onnx": "ONNX, checked against onnxruntime",
    "save": "saved model, fxlrd.load reads it",
    "report": "JSON report",
}


def _fidelity_text(f: Mapping[str, Any]) -> str:
    parts = []
    if f.get("relative_error") is not None:
        parts.append(f"relative error {f['relative_error']:.4f}")
    if f.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {100 * f['top1_agreement']:.1f}%")
    if f.get("cosine") is not None:
        parts.append(f"mean cosine {f['cosine']:.4f}")
    return f"{', '.join(parts) or 'not measured'} ({f['output']}; {f['inputs']})"


def print_summary(report: Mapping[str, Any], out=None) -> None:
    """Print a compress report: model, params, MACs, latency, fidelity, files."""
    out = out or sys.stdout
    p = lambda text="": print(text, file=out)  # noqa: E731
    m, params, macs, layers = report["model"], report["params"], report["macs"], report.get("layers") or {}
    capture = (report.get("capture") or {}).get("mode", "?")
    p(f"model       {m['spec']} ({m['class']}, {m['origin']}{', ' + ', '.join(m['notes']) if m.get('notes') else ''}); "
      f"inputs {m['inputs']}; captured with {capture}")  # fmt: skip
    calibrated = (report.get("calibration") or {}).get("batches")
    p(f"compress    {report['transform_s']:.2f} s" + (f", {calibrated} calibration batches" if calibrated else ""))
    if layers:
        p(f"layers      {layers['original']} -> {layers['compressed']} conv/linear")
    p(f"params      {_count(params['original'])} -> {_count(params['compressed'])} ({_x(params['ratio'])} fewer)")
    p(f"MACs        {_count(macs['original'])} -> {_count(macs['compressed'])} ({_x(macs['ratio'])} fewer)")
    lat = report.get("latency")
    if lat:
        env = report.get("environment", {})
        where = " CPU" if lat["backend"] == "onnxruntime" else ""
        p(f"latency     {lat['backend']}{where}, batch {lat['batch']}, {lat['threads']} threads, "
          f"median of {lat['repeats']} (variants taking turns) on {env.get('processor', '?')}")  # fmt: skip
        if lat.get("fallback"):
            p(f"  note       {lat['fallback']}")
        for name in ("original", "compressed", "int8"):
            if name in lat:
                t = lat[name]
                p(f"  {name:<10} {_ms(t['median'])} ms (min {_ms(t['min'])}, max {_ms(t['max'])})")
        p(f"  speed-up   {_x(lat['speedup'])} (MAC ratio {_x(macs['ratio'])})"
          + (f"; int8 {_x(lat['speedup_int8'])}" if "speedup_int8" in lat else ""))  # fmt: skip
    else:
        p("latency     not measured (--repeats 0)")
    p(f"fidelity    {_fidelity_text(report['fidelity'])}")
    if report.get("int8"):
        q = report["int8"]
        p(f"  int8 ({q['scheme']}) {_fidelity_text(q['fidelity'])}")
        w = q.get("weights") or {}
        if w:
            p(f"  int8 weights {w['int8']} of {w['total']} weight tensors")
        if q["scheme"] == "dynamic" and w and 2 * w["int8"] < w["total"]:
            p("  (dynamic int8 quantizes the matrix products only; for a conv model use --int8 static --calibration ...)")
    if report.get("norms_reestimated"):
        p(f"            ({report['norms_reestimated']} norms moved by merging were re-estimated)")
    blocks = report.get("reconstructed")
    if blocks:
        applied = [b for b in blocks.values() if b["applied"]]
        def known(value: Any) -> bool:  # NaN in memory, null in a report file: none held out
            return isinstance(value, (int, float)) and math.isfinite(value)

        with_held = [b for b in blocks.values() if known(b.get("held_out_before")) and known(b.get("held_out_after"))]
        if with_held:
            held = lambda key: sum(b[key] for b in with_held) / len(with_held)  # noqa: E731
            where = f"their mean held-out output error {held('held_out_before'):.4g} -> {held('held_out_after'):.4g}"
        else:  # too few positions to hold any out: the training error is all there is
            train = lambda key: sum(b[key] for b in blocks.values() if known(b.get(key))) / len(blocks)  # noqa: E731
            where = (f"too few positions to hold any out; training output error {train('train_before'):.4g} -> "
                     f"{train('train_after'):.4g}")  # fmt: skip
        p(f"            ({len(applied)} of {len(blocks)} narrowed MLP blocks retrained; {where})")
    d = report.get("distilled")
    if d:
        p(f"            (distilled {d['steps']} steps in {d['seconds']:.0f} s on {d['batches']} calibration batches; "
          f"training loss {d['loss_first']:.4g} -> {d['loss_last']:.4g})")  # fmt: skip
        if d.get("validation_batches"):
            p(f"            (early stopping on {d['validation_batches']} held-out calibration batches: the model kept "
              f"step {d['kept_step']} of {d['steps']}, their loss {d['validation_start']:.4g} -> "
              f"{d['validation_kept']:.4g})")  # fmt: skip
    for what, path in (report.get("files") or {}).items():
        kind = _FILE_KINDS.get(what, what)
        if what == "onnx" and report.get("int8"):
            kind = f"ONNX in {report['int8']['scheme']} int8, within qtol of PyTorch on the example"
        p(f"wrote       {path} ({kind})")


def cmd_compress(args: argparse.Namespace) -> int:
    """``fxlrd compress MODEL``."""
    console = _Console(args.quiet)
    report = _compress(args, console)
    print(report["plan_table"])
    print()
    print_summary(report)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``fxlrd demo``: compress a zoo model into ``--out`` (ONNX, save, report)."""
    out = Path(args.out)
    # the outputs go in --out, named after the model (a path or package.module:factory made a plain name)
    spec = args.model.rstrip("/\\")
    module, _, factory = spec.rpartition(":")
    base = f"{Path(module).stem}_{factory}" if module else Path(spec).name
    name = re.sub(r"[^\w.-]+", "_", base).strip("._") or "model"
    args.onnx = str(out / f"{name}_lrd.onnx")
    args.save = str(out / f"{name}_lrd")
    args.report = str(out / f"{name}_report.json")
    args.overwrite = True
    for what, q in _input_paths(args):  # named by the option the user gave (--onnx etc. are the demo's own)
        if out.resolve() == q.resolve() or q.resolve() in out.resolve().parents:
            raise UsageError(f"--out {args.out} would put the demo's files in {what} ({q.resolve()}): choose another "
                             "--out")  # fmt: skip
    env = _environment(args)
    print("fxlrd demo on " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"settings: model={args.model} ratio={_config(args).ratio:g} quantum={_config(args).rank_quantum} backend={args.backend} "
          f"threads={args.threads} repeats={args.repeats}\n")  # fmt: skip
    return cmd_compress(args)


def cmd_plan(args: argparse.Namespace) -> int:
    """``fxlrd plan MODEL``: print (and write) the plan without decomposing."""
    from .api import plan as make_plan

    config = _config(args)
    json_path = _check_output(args.json, "--json")
    _check_distinct(args, {"--json": json_path})
    torch.manual_seed(args.seed)  # a factory's or zoo model's own random weights: the same every run
    source = load_model(args.model, weights=args.weights, quiet=args.quiet)
    inputs = _Inputs(source, args)
    example = inputs.random(args.seed)
    _check_inputs(source.model, inputs, example)
    p = make_plan(source.model, config, example_inputs=example, capture=args.capture)
    print(p.table())
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        p.to_json(json_path)
        print(f"plan written to {json_path}")
    return 0


# -- inspect --------------------------------------------------------------------------------------
def _inspect_save(path: Path) -> int:
    from .io import PLAN_FILE, SavedModelError, read_metadata, verify
    from .plan import Plan

    meta = read_metadata(path)
    integrity, status = "ok (sha256 of every file matches)", 0
    try:
        verify(path)
    except SavedModelError as exc:
        integrity, status = f"FAILED: {_one_line(exc)}", 1
    capture = meta.get("capture") or {}
    sig = meta.get("inputs") or {}
    kwargs, positional = sig.get("kwargs") or {}, sig.get("args") or []
    shapes = [f"{k}={v.get('dtype')}{v.get('shape')}" for k, v in kwargs.items() if isinstance(v, dict)]
    shapes += [f"{a.get('dtype')}{a.get('shape')}" for a in positional if isinstance(a, dict) and "shape" in a]
    mode = "train" if (meta.get("modes") or {}).get("training") else "eval"
    files = ", ".join(f"{name} {_count(info.get('bytes'), 'B')}" for name, info in (meta.get("files") or {}).items())
    print(f"fxlrd saved model {path}")
    print(f"  format      {meta['format']}, written by fxlrd {meta.get('fxlrd', '?')} (torch {meta.get('torch', '?')}, "
          f"python {meta.get('python', '?')}) at {meta.get('created', '?')}")  # fmt: skip
    print(f"  model       {meta.get('model_class', '?')}, captured with {capture.get('mode', '?')}; "
          f"inputs {', '.join(shapes) or 'not recorded'}; {mode} mode")  # fmt: skip
    print(f"  files       {files}; {meta.get('tensors', '?')} tensors on {meta.get('device', '?')}")
    print(f"  integrity   {integrity}")
    plan_file = path / PLAN_FILE
    if plan_file.is_file():
        try:
            plan = Plan.from_json(plan_file)
        except Exception as exc:  # noqa: BLE001  (a corrupt plan is reported, not raised)
            print(f"  plan        unreadable: {_one_line(exc)}")
            return 1
        s = plan.settings
        print(f"  settings    ratio={s.get('ratio')} rank_rule={s.get('rank_rule')} quantum={s.get('rank_quantum')} "
              f"merge={s.get('merge')} branches={s.get('branches')} conv_method={s.get('conv_method')}\n")  # fmt: skip
        print(plan.table())
    return status


def cmd_inspect(args: argparse.Namespace) -> int:
    """``fxlrd inspect PATH``: a saved model's metadata and plan, or a report's summary."""
    from .plan import Plan

    path = Path(args.path)
    try:
        if path.is_dir():
            return _inspect_save(path)
        if not path.exists():
            raise CommandError(f"{path} does not exist")
        if not path.is_file():
            raise UsageError(f"{path} is not a file or a directory; inspect takes a saved model directory or a "
                             "report/plan JSON")  # fmt: skip
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(
                f"{path} is not JSON ({exc}); inspect takes a saved model directory or a report/plan JSON"
            ) from exc
        fmt = data.get("format") if isinstance(data, dict) else None
        if fmt == REPORT_FORMAT:
            print(data.get("plan_table", ""))
            print()
            print_summary(data)
        elif fmt == BENCH_FORMAT:
            print_bench(data)
        elif isinstance(fmt, str) and fmt.startswith("fxlrd.plan/"):
            print(Plan.from_dict(data).table())
        else:
            raise UsageError(f"{path} is not an fxlrd report, bench result or plan (format {fmt!r})")
    except FxlrdError:
        raise  # fxlrd's own errors say what is wrong already
    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a file edited by hand, or of another version
        raise CommandError(f"{path} is malformed ({type(exc).__name__}: {_one_line(exc)}); it was edited, or "
                           "written by another version of fxlrd") from exc  # fmt: skip
    return 0


# -- bench ----------------------------------------------------------------------------------------
def _variant_config(args: argparse.Namespace, variant: str):
    from .latency import LatencyConfig

    if variant == "vanilla":  # the paper's ranks: no latency search (--latency is the optimized variant's)
        return _config(args, rank_quantum=1, latency=None)
    if variant == "quantized":
        return _config(args, latency=None)
    if variant == "optimized":
        return _config(args, latency=LatencyConfig(backend=args.latency or args.backend, threads=args.threads,
                                                   progress=not args.quiet, context=args.timing_context,
                                                   quantize=QUANTIZE_OF.get(args.timing_int8)))  # fmt: skip
    if variant == "merged":
        return _config(args, merge="approximate", latency=None)
    if variant == "branched":
        return _config(args, branches=2, latency=None)
    raise UsageError(f"unknown variant {variant!r}")  # pragma: no cover  (the parser checks)


def _variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose variants among {', '.join(VARIANTS)} (comma-separated), got {text!r}")
    return list(dict.fromkeys(names))


def cmd_bench(args: argparse.Namespace) -> int:
    """``fxlrd bench MODEL``: variants side by side, timed taking turns."""
    from .api import transform
    from .metrics import count_params

    configs = {v: _variant_config(args, v) for v in args.variants if v != "original"}
    plot_path = _check_output(args.plot, "--plot")
    if plot_path is not None:
        plot_path = _plot_path(plot_path)
    report_path = _check_output(args.report, "--report")
    _check_distinct(args, {"--plot": plot_path, "--report": report_path})
    _check_calibration_path(args)
    console = _Console(args.quiet)
    console.step(f"loading {args.model}")
    torch.manual_seed(args.seed)  # a factory's or zoo model's own random weights: the same every run
    source = load_model(args.model, weights=args.weights, quiet=args.quiet)
    inputs = _Inputs(source, args)
    data = _data(args, inputs, console)
    model = source.model
    _check_inputs(model, inputs, data.example, data.calibration)
    models: dict[str, nn.Module] = {}
    rows: dict[str, dict[str, Any]] = {}
    for variant in args.variants:
        if variant == "original":
            models[variant], seconds = model, 0.0
        else:
            console.step(f"compressing: {variant}")
            t0 = time.perf_counter()
            with _blas_single_thread():
                gm = transform(model, configs[variant], example_inputs=data.example, capture=args.capture,
                               calibration=data.calibration)  # fmt: skip
            seconds = time.perf_counter() - t0
            _recover_norms(gm, model, data.calibration or [inputs.random(args.seed + 2000 + i) for i in range(4)])
            models[variant] = gm
        fid = fidelity(model, models[variant], data.held_out) if variant != "original" else {}
        m = models[variant]
        rows[variant] = {"layers": None, "params": count_params(m), "macs": _macs(m, data.example),
                         "transform_s": seconds, "relative_error": fid.get("relative_error"),
                         "top1_agreement": fid.get("top1_agreement")}  # fmt: skip
    plans = [m.fxlrd_plan for m in models.values() if getattr(m, "fxlrd_plan", None) is not None]
    for variant, m in models.items():  # the original's sites as any variant's plan lists them
        rows[variant]["layers"] = _layer_count(m, plans[0] if plans else None)
    base = rows[args.variants[0]]
    times = None
    timing: dict[str, Any] = {"backend": args.backend, "threads": args.threads, "repeats": args.repeats,
                              "batch": _batch_size(data.example, inputs)}  # fmt: skip
    if args.repeats > 0:
        times, timing["backend"], fallback = _time(args, models, data.example, console)
        if fallback:
            timing["fallback"] = fallback
    for variant, row in rows.items():
        row["mac_ratio"] = _ratio(base["macs"], row["macs"])
        if times is not None:
            row["latency"] = times[variant]
            row["speedup"] = _ratio(times[args.variants[0]]["median"], times[variant]["median"])
            row["speedup_per_mac_ratio"] = _ratio(row["speedup"], row["mac_ratio"])
    report = {
        "format": BENCH_FORMAT,
        "command": ["fxlrd", *getattr(args, "argv", [])],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": _environment(args),
        "model": {"spec": args.model, "class": type(model).__name__, "inputs": inputs.describe(),
                  "notes": source.notes},  # fmt: skip
        "baseline": args.variants[0],
        "timing": timing,
        "fidelity_inputs": data.note,
        "settings": {v: c.to_dict() for v, c in configs.items()},
        "variants": rows,
    }
    print_bench(report)
    if report_path is not None:
        _write_json(report_path, report)
        print(f"report written to {report_path}")
    if plot_path is not None:
        _plot_bench(report, plot_path)
        print(f"plot written to {plot_path}")
    return 0


def print_bench(report: Mapping[str, Any], out=None) -> None:
    """Print a bench result as a table."""
    out = out or sys.stdout
    timing, rows = report["timing"], report["variants"]
    head = ("variant", "layers", "params", "MACs", "MAC ratio", "median ms", "min ms", "max ms", "speed-up",
            "speed-up/MAC ratio", "rel. error")  # fmt: skip
    table = [head]
    for name, r in rows.items():
        lat = r.get("latency") or {}
        table.append((name, str(r["layers"]), _count(r["params"]), _count(r["macs"]), _x(r.get("mac_ratio")),
                      _ms(lat.get("median")), _ms(lat.get("min")), _ms(lat.get("max")), _x(r.get("speedup")),
                      "-" if r.get("speedup_per_mac_ratio") is None else f"{r['speedup_per_mac_ratio']:.2f}",
                      "-" if r.get("relative_error") is None else f"{r['relative_error']:.4f}"))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    env = report.get("environment", {})
    print(f"{report['model']['spec']} ({report['model']['class']}), inputs {report['model']['inputs']}; "
          + (f"{timing['backend']}, {timing['threads']} threads, median of {timing['repeats']} taking turns "
             if timing["repeats"] else "not timed (--repeats 0) ")
          + f"on {env.get('processor', '?')} (torch {env.get('torch', '?')})", file=out)  # fmt: skip
    if timing.get("fallback"):
        print(f"note: {timing['fallback']}", file=out)
    for i, row in enumerate(table):
        cells = (v.ljust(w) if j == 0 else v.rjust(w) for j, (v, w) in enumerate(zip(row, widths)))
        print("  ".join(cells).rstrip(), file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=out)
    print(f"speed-up and MAC ratio against {report['baseline']}; relative output error on {report['fidelity_inputs']}",
          file=out)  # fmt: skip


def _plot_path(path: Path) -> Path:
    """``--plot``'s file: a format matplotlib writes (``.png`` added to a name without a suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    if not path.suffix:
        return path.with_name(path.name + ".png")
    if path.suffix[1:].lower() not in formats:
        raise UsageError(f"--plot {path}: {path.suffix} is not an image format matplotlib writes; use .png, .svg or .pdf")
    return path


def _plot_bench(report: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    speed = [report["variants"][n].get("speedup") or 0 for n in names]
    macs = [report["variants"][n].get("mac_ratio") or 0 for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], speed, width=0.4, label="speed-up (measured)")
    ax.bar([x + 0.2 for x in xs], macs, width=0.4, label="MAC ratio")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel(f"× {report['baseline']}")
    timing = report["timing"]
    title = f"{report['model']['spec']}: {timing['backend']}, batch {timing['batch']}, {timing['threads']} threads"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:  # an earlier plot is replaced whole or not at all
            fig.savefig(tmp)
    finally:
        plt.close(fig)


# -- the parser -----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors become one line (`UsageError`) instead of usage + exit."""

    def error(self, message: str):  # noqa: D401
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def parse_args(self, args=None, namespace=None):  # an option unknown to a command points to that command's help
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            prog = f"{self.prog} {command}" if command else self.prog
            raise UsageError(f"unrecognized arguments: {' '.join(extras)} (see '{prog} --help')")
        return parsed


def _add_common(p: argparse.ArgumentParser, top: bool = False) -> None:
    default = False if top else argparse.SUPPRESS
    p.add_argument("--debug", action="store_true", default=default, help="show tracebacks and library warnings")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress output on stderr")


def _add_model(p: argparse.ArgumentParser, positional: bool = True) -> None:
    g = p.add_argument_group("model and inputs")
    if positional:
        g.add_argument("model", metavar="MODEL", help=f"a zoo name ({', '.join(_zoo_names())}), "
                       "package.module:factory, or a Hugging Face model directory")  # fmt: skip
    else:
        g.add_argument("--model", default="resnet50", metavar="MODEL", help="as for compress (default: resnet50)")
    g.add_argument("--weights", metavar="FILE", help="state dict to load with strict=True (.safetensors, .pt, .pth)")
    g.add_argument("--input-shape", type=_parse_shape, metavar="N,C,H,W",
                   help="input tensor shape, batch first (default 1,3,224,224 for image models)")  # fmt: skip
    g.add_argument("--size", type=_positive_int, metavar="PX", help="image height and width (instead of --input-shape)")
    g.add_argument("--batch", type=_positive_int, metavar="N",
                   help="batch size of every input (default: 1 for text models, else the batch of --input-shape "
                        "or of the model's own input shape)")  # fmt: skip
    g.add_argument("--seq-len", type=_positive_int, metavar="N",
                   help="sequence length for text models (default 128, or the model's longest if shorter)")  # fmt: skip
    g.add_argument("--capture", choices=("auto", "fx", "export"), default="auto",
                   help="torch.fx, torch.export, or fx then export (default auto)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the random inputs, and of the weights a model without --weights is made with "
                        "(default 0)")  # fmt: skip


def _add_config(p: argparse.ArgumentParser, variants: bool = False, data: bool = True) -> None:
    """The decomposition options (``data``: those that fit on --calibration data too; plan has none)."""
    from .latency import BACKENDS

    g = p.add_argument_group("decomposition")
    g.add_argument("--ratio", type=float, metavar="A", help="compression ratio per layer, > 1 (default 2); where MLP blocks are "
                                                                    "narrowed and --target-params sizes the model, the blocks' ratio")
    g.add_argument("--rank-rule", choices=("ratio", "fixed", "energy", "vbmf"), default="ratio",
                   help="how ranks are chosen (default ratio)")  # fmt: skip
    g.add_argument("--rank", type=_rank, metavar="R[,R2]", help="rank for --rank-rule fixed: R or R1,R2")
    g.add_argument("--energy", type=float, metavar="E", help="spectral energy kept for --rank-rule energy, in (0, 1]")
    g.add_argument("--quantum", type=_positive_int, metavar="Q",
                   help="round ranks down to a multiple of this (default: the CPU's vector width, "
                        "16 with AVX-512, 8 with AVX2)")  # fmt: skip
    g.add_argument("--allocation", choices=("uniform", "global"), default="uniform",
                   help="uniform: every layer at --ratio; global: --ratio over the whole model, ranks "
                        "allocated by (data-aware with --calibration) error (default uniform)")  # fmt: skip
    shown = (lambda text: text) if data else (lambda text: argparse.SUPPRESS)  # plan: refused with the way out
    g.add_argument("--sequential", action="store_true",
                   help=shown("with --calibration: fit each layer to the outputs of the already-compressed ones"))
    g.add_argument("--sensitivity", choices=tuple(_SENSITIVITY),  # None: output, and one given needs --calibration
                   help=shown("with --calibration, what of the model's output to preserve: output (every output, "
                              "squared error; default), kl (a classifier's predicted distribution), diagonal (as "
                              "output, with a diagonal sensitivity: less memory for large layers), off (each layer's "
                              "own output error)"))  # fmt: skip
    g.add_argument("--mlp", choices=("factorize", "narrow"), default="factorize",
                   help=shown("MLP blocks (linear, activation, linear; gated ones, act(gate(x)) * up(x); or inverted "
                              "residuals: 1x1 conv, depthwise "
                              "conv, 1x1 conv): factorize their layers (default) or, with --calibration, narrow them "
                              "(fewer hidden neurons or channels, chosen on the data)"))  # fmt: skip
    g.add_argument("--siblings", default="separate", metavar="separate|fuse|GLOB,...",
                   help="linear layers reading one input (attention's query, key, value): decompose each on its own "
                        "(default), or fuse them first so they share one input factor (fewer GEMMs); GLOB,...: "
                        "fuse only the layers these patterns match (e.g. '*.query,*.key')")  # fmt: skip
    g.add_argument("--experts", choices=("factorize", "keep"), default="factorize",
                   help="a mixture of experts' stacked expert weights (torch.bmm(P[ids], x) or grouped_mm, "
                        "transformers' 'batched_mm' and 'grouped_mm' experts): factorize each expert (default; data-aware with "
                        "--calibration) or keep them whole")  # fmt: skip
    g.add_argument("--beta", type=float, default=1.0, metavar="B", help="Tucker r2/r1 (default 1)")
    g.add_argument("--conv-method", choices=_conv_methods(), default="tucker2",
                   help="method for k×k convs (default tucker2)")  # fmt: skip
    g.add_argument("--include", action="append", metavar="GLOB", help="decompose only layers matching (repeatable)")
    g.add_argument("--exclude", action="append", metavar="GLOB", help="never decompose layers matching (repeatable)")
    g.add_argument("--latency", choices=BACKENDS, metavar="BACKEND",
                   help=f"choose ranks by timing layers on BACKEND ({', '.join(BACKENDS)})")  # fmt: skip
    g.add_argument("--timing-context", choices=("layer", "neighbours"), default="layer",
                   help="time each layer alone, or inside its neighbouring operations (batch norm, activation, "
                        "residual add, up to the next layers) as the deployed model runs it (default layer)")  # fmt: skip
    g.add_argument("--timing-int8", choices=INT8_SCHEMES, metavar="SCHEME",
                   help="time layers (and global mode's whole models) after onnxruntime's int8 quantization, "
                        f"{' or '.join(INT8_SCHEMES)} as --int8, to choose ranks for an int8 deployment (onnxruntime "
                        "timing only)")  # fmt: skip
    g.add_argument("--target-params", type=_target_params, metavar="N",
                   help="parameter budget for the whole model: a count (5M) or a fraction (0.5)")  # fmt: skip
    if not variants:
        g.add_argument("--target-speedup", type=float, metavar="X",
                       help="global mode: the whole-model speed-up to reach (ranks timed on the timing backend)")
        g.add_argument("--merge", choices=("exact", "approximate"), help="merge factors into neighbouring 1×1 layers")
        g.add_argument("--branches", type=_positive_int, default=1, metavar="N",
                       help="N-branched Tucker cores (default 1)")  # fmt: skip


def _add_data(p: argparse.ArgumentParser, reconstruct: bool = False) -> None:
    g = p.add_argument_group("calibration and fidelity")
    g.add_argument("--calibration", metavar="PATH",
                   help="data-aware decomposition on: a folder of images (each resized, its shorter side to "
                        "--image-resize, centre-cropped to the input size and normalized with --image-mean/--image-std, "
                        "by default ImageNet's), a .txt file (one text a line, needs a tokenizer), or a .pt/.safetensors "
                        "tensor (N, ...): integer tensors (token ids) as they are, floating ones in float32")  # fmt: skip
    g.add_argument("--image-mean", type=_floats, metavar="M[,M,M]",
                   help="images' per-channel mean subtracted after scaling pixels to [0, 1] (default ImageNet's "
                        "0.485,0.456,0.406; 0 for [0, 1] inputs, 0.5 for many ViTs)")  # fmt: skip
    g.add_argument("--image-std", type=_floats, metavar="S[,S,S]",
                   help="images' per-channel standard deviation divided by (default ImageNet's 0.229,0.224,0.225; 1 "
                        "for [0, 1] inputs, 0.5 for many ViTs)")  # fmt: skip
    g.add_argument("--image-resize", type=_positive_int, metavar="PX",
                   help="images' shorter side before the centre crop (default: the input's larger side / 0.875, "
                        "ImageNet's 256 for 224; the input size itself: no margin cropped)")  # fmt: skip
    g.add_argument("--calibration-batches", type=_positive_int, default=16, metavar="N",
                   help="calibration batches (default 16)")  # fmt: skip
    g.add_argument("--eval-batches", type=_positive_int, default=4, metavar="N",
                   help="held-out batches for fidelity, never used for calibration (default 4)")  # fmt: skip
    if reconstruct:
        g.add_argument("--reconstruct", type=_non_negative_int, default=0, metavar="STEPS",
                       help="with --mlp narrow: then train each narrowed block alone for STEPS Adam steps to reproduce "
                            "the original block on the calibration data (fxlrd.recover.reconstruct_mlps; 800 is "
                            "its default; 0, the default here: off)")  # fmt: skip
        g.add_argument("--distill", type=_non_negative_int, default=0, metavar="STEPS",
                       help="then distil the compressed model to the original for STEPS Adam steps on the calibration "
                            "data (fxlrd.recover.distill: KL on classifier logits, relative MSE on hidden states, "
                            "padding tokens left out; an eighth of the batches, at least one, held out for early "
                            "stopping; 0, the default: off)")  # fmt: skip
        g.add_argument("--distill-lr", type=_positive_float, default=1e-4, metavar="LR",
                       help="--distill's learning rate, on a half cosine down to 0 (default 1e-4)")  # fmt: skip


def _add_timing(p: argparse.ArgumentParser, repeats: int = 20) -> None:
    g = p.add_argument_group("timing")
    g.add_argument("--backend", choices=TIMING_BACKENDS, default="onnxruntime",
                   help="where models are timed: onnxruntime (CPU), eager torch, or torch.compile "
                        "(default onnxruntime; where torch.onnx cannot export a model, eager torch, with a note)")  # fmt: skip
    g.add_argument("--threads", type=_positive_int, default=os.cpu_count() or 1, metavar="N",
                   help="intra-op threads when timing (default: all cores)")  # fmt: skip
    g.add_argument("--repeats", type=_non_negative_int, default=repeats, metavar="N",
                   help=f"timed runs per model, taking turns; 0 skips timing (default {repeats})")  # fmt: skip


def _add_outputs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("outputs")
    g.add_argument("--onnx", metavar="PATH", help="export the compressed model to ONNX (checked against onnxruntime)")
    g.add_argument("--int8", choices=INT8_SCHEMES, default=None,
                   help="write the --onnx file in int8: static (onnxruntime static quantization calibrated on "
                        "--calibration; CNNs) or dynamic (the matrix products' inputs scaled per call, no "
                        "calibration; transformers). Its fidelity to the original is measured too, and it is timed "
                        "beside the float models")  # fmt: skip
    g.add_argument("--save", metavar="DIR", help="save the compressed model (fxlrd.save: plan + safetensors)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --save directory")
    g.add_argument("--report", metavar="JSON", help="write everything measured, with machine info, as JSON")


_DESCRIPTION = "Low-rank decomposition of PyTorch models that pays off in wall-clock time."
_EPILOG = """examples:
  fxlrd compress resnet50 --ratio 2 --onnx build/r50.onnx --save build/r50
  fxlrd compress mypkg.nets:make_net --weights net.safetensors --input-shape 1,3,64,64
  fxlrd compress ./bert-dir --seq-len 64 --calibration sentences.txt --report bert.json
  fxlrd inspect build/r50          a saved model's metadata and plan (or a report JSON)
  fxlrd bench resnet50 --plot bench.png
  fxlrd demo                       compress a zoo model (default ResNet-50) into build/: ONNX, save, report

MODEL is a zoo name (%s), package.module:factory (imported
and called), or a local Hugging Face model directory.

exit status: 0 success, 1 the work failed, 2 bad usage; errors are one line on stderr
(--debug adds the traceback)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``fxlrd`` argument parser."""
    from . import __version__

    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="fxlrd", description=_DESCRIPTION, epilog=_EPILOG % ", ".join(_zoo_names()),
                     formatter_class=formatter)  # fmt: skip
    parser.add_argument("--version", action="version", version=f"fxlrd {__version__}")
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    compress = sub.add_parser(
        "compress", help="decompose a model; print its plan, params, MACs, latency and fidelity",
        description="Decompose MODEL's conv and linear layers, print the per-layer plan and a summary: parameters, "
                    "MACs, latency before and after (taking turns on the timing backend), and fidelity on held-out "
                    "inputs. Optionally export ONNX, save the model and write a JSON report.",
    )  # fmt: skip
    _add_model(compress)
    _add_config(compress)
    _add_data(compress, reconstruct=True)
    _add_timing(compress)
    _add_outputs(compress)
    _add_common(compress)
    compress.set_defaults(func=cmd_compress)

    inspect = sub.add_parser("inspect", help="show a saved model's plan and metadata, or a report's summary",
                             description="Print a saved model's metadata (checking its files) and plan table, or the "
                                         "summary of a compress report, bench result or plan JSON.")  # fmt: skip
    inspect.add_argument("path", metavar="DIR_OR_REPORT",
                         help="a directory written by --save, or a JSON from --report/--json")  # fmt: skip
    _add_common(inspect)
    inspect.set_defaults(func=cmd_inspect)

    bench = sub.add_parser(
        "bench", help="time a model's variants side by side",
        description="Build the variants of MODEL and time them in one run, taking turns: original, vanilla (paper "
                    "ranks, quantum 1), quantized (--quantum), optimized (ranks timed on --latency or the timing "
                    "backend), merged (approximate) and branched (2).",
    )  # fmt: skip
    _add_model(bench)
    _add_config(bench, variants=True)
    bench.add_argument("--variants", type=_variants, default=list(DEFAULT_VARIANTS), metavar="LIST",
                       help=f"comma-separated, the first is the baseline (default {','.join(DEFAULT_VARIANTS)}; "
                            f"choices {','.join(VARIANTS)})")  # fmt: skip
    _add_data(bench)
    _add_timing(bench)
    bench.add_argument("--plot", metavar="PNG", help="bar chart of speed-up and MAC ratio per variant")
    bench.add_argument("--report", metavar="JSON", help="write the results as JSON")
    _add_common(bench)
    bench.set_defaults(func=cmd_bench)

    plan = sub.add_parser("plan", help="print a model's decomposition plan (nothing is decomposed)")
    plan.add_argument("model_arg", nargs="?", metavar="MODEL", help="as for compress (or --model; default resnet50)")
    _add_model(plan, positional=False)
    _add_config(plan, data=False)  # no --calibration: the options that fit on data are compress's (not listed)
    plan.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    _add_common(plan)
    plan.set_defaults(func=cmd_plan)

    demo = sub.add_parser("demo", help="compress a model (by default a zoo ResNet-50) into --out: ONNX, saved model, report",
                          description="compress --model with --onnx, --save and --report into --out.")  # fmt: skip
    _add_model(demo, positional=False)
    demo.add_argument("--out", default="build", help="output folder (default build)")
    _add_config(demo)
    _add_data(demo)
    _add_timing(demo, repeats=30)
    _add_common(demo)
    demo.set_defaults(func=cmd_demo, onnx=None, save=None, report=None, overwrite=True)
    return parser


@contextlib.contextmanager
def _library_noise(debug: bool) -> Iterator[None]:
    """Outside ``--debug``, keep library warnings (deprecations in torch's pytree, exporter
    notes) off the user's terminal."""
    if debug:
        yield
        return
    # torchao (imported by transformers when installed) logs its optional CUDA kernels failing
    # to load and torch's pytree logs deprecations of torchao's registrations: not the user's.
    # torch.export's shape solver logs the data-dependent guards it cannot trace to user code (before it raises).
    names = ("torchao", "torch.utils._pytree", "torch.fx.experimental.symbolic_shapes")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning, UserWarning):
                warnings.simplefilter("ignore", category)
            warnings.simplefilter("always", FxlrdWarning)  # fxlrd's own: a target not reached, a cache not written
            warnings.showwarning = lambda message, *_, **__: print(f"fxlrd: warning: {message}", file=sys.stderr)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# The Python API's remedies in library messages, as the command line says them
_PYTHON_REMEDIES = (
    (re.compile(r"^sensitivity='kl' needs"), "--sensitivity kl needs"),
    (re.compile(r"Pass sensitivity=fn\(outputs, inputs\) returning the logits, or sensitivity=True"),
     "On the command line use --sensitivity output (or diagonal), which preserves every output instead"),
    (re.compile(r"(?i:e)xclude sensitive operators with QuantizeConfig\([^)]*\), or accept more with "
                r"QuantizeConfig\(qtol=\.\.\.\)"),
     "try the other scheme (--int8 static with --calibration for a CNN, --int8 dynamic for a transformer), or drop "
     "--int8 for a float32 file (excluding operators or accepting more error is the Python API's: "
     "fxlrd.export_onnx(..., quantize=QuantizeConfig(op_types=..., qtol=...)))"),
    (re.compile(r"real inputs like example_inputs"), "real inputs of the model"),
)


def _for_the_command_line(text: str) -> str:
    """``text`` with the Python API's remedies it names put as command-line options."""
    for pattern, replacement in _PYTHON_REMEDIES:
        text = pattern.sub(replacement, text)
    return text


def _stdout_closed() -> bool:
    """Whether standard output's reader has gone (a pipe closed early); if so, it is pointed
    at the null device, so Python's flush at exit does not fail again."""
    closed = False
    try:
        import select

        poll = select.poll()  # a pipe without a reader reports an error (Linux), whatever a flush says
        poll.register(sys.stdout.fileno(), 0)
        closed = any(event & select.POLLERR for _, event in poll.poll(0))
    except (OSError, ValueError, AttributeError, ImportError):  # (no descriptor, no poll: the flush decides)
        pass
    if not closed:
        try:
            sys.stdout.flush()
            return False
        except BrokenPipeError:
            closed = True
        except (OSError, ValueError, AttributeError):
            return False
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # (no file descriptor: nothing left to flush there)
        pass
    return closed


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fxlrd`` command; returns the exit status (0 ok, 1 failure, 2 bad usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    except UsageError as exc:
        print(f"fxlrd: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    args.argv = argv
    if getattr(args, "model_arg", None) is not None:
        args.model = args.model_arg
    try:
        with _library_noise(args.debug):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("fxlrd: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (every failure: one line; the traceback with --debug)
        if isinstance(exc, BrokenPipeError) and _stdout_closed():  # the reader stopped (fxlrd inspect DIR | head)
            return 0
        if debug:
            import traceback

            traceback.print_exc()
        usage = isinstance(exc, (UsageError, ConfigError))
        text = _one_line(exc) if isinstance(exc, (UsageError, CommandError, FxlrdError, OSError)) else (
            f"{type(exc).__name__}: {_one_line(exc)}")  # fmt: skip
        text = _for_the_command_line(text)
        expected = usage or isinstance(exc, (CommandError, FxlrdError, OSError))
        hint = "" if debug or expected else " (--debug shows the traceback)"
        tried_one = getattr(args, "capture", None) in ("fx", "export")
        if isinstance(exc, CaptureError) and "--capture" not in text and tried_one:
            # its fix is written for the Python API; under --capture auto both captures were tried
            hint += f" (on the command line: --capture {'fx' if getattr(args, 'capture', None) == 'export' else 'export'})"
        print(f"fxlrd: error: {text}{hint}", file=sys.stderr)
        return 2 if usage else 1


if __name__ == "__main__":
    sys.exit(main())
