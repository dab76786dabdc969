"""Saving and loading decomposed models: plan JSON + safetensors + metadata, no pickle.

A saved model is a directory of three files::

    plan.json          the Plan (gm.fxlrd_plan): every layer's method and ranks, the
                       LRDConfig, how the model was captured and its input signature
    model.safetensors  the state dict (tensors only; tied tensors stored once)
    metadata.json      format version, fxlrd/torch/python versions, the input signature,
                       sha256 of the other files, train/eval modes, creation time

`save` writes them into a temporary directory beside the target and renames it into place,
so a reader never sees half a save and an interrupted ``overwrite=True`` leaves the previous
save as it was. `load` takes the user's *original* model (the one ``fxlrd.transform`` was
given) and rebuilds the decomposed structure on it without decomposing again: it captures
the model the way the plan records, puts empty `Factorized` skeletons of the planned ranks
in place (`fxlrd.passes.DecomposePass` with precomputed factors), replays the branch and
merge passes the plan's settings name, and loads the saved tensors with ``strict=True``.
The result equals the saved model bitwise.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from ._files import umask
from .capture import capture, check_module, inputs_from_signature, normalize_inputs, warn_dynamic_shapes, widens
from .errors import FxlrdError, PlanMismatchError
from .factorized import Factorized, skeleton
from .plan import Plan
from .sites import uncompiled

__all__ = [
    "save",
    "load",
    "verify",
    "read_metadata",
    "SavedModelError",
    "FORMAT",
    "FORMAT_VERSION",
    "PLAN_FILE",
    "WEIGHTS_FILE",
    "METADATA_FILE",
]

FORMAT_NAME = "fxlrd.saved-model"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"
_HASHED_FILES = (PLAN_FILE, WEIGHTS_FILE)
_CHUNK = 1 << 20


class SavedModelError(FxlrdError, ValueError):
    """A saved model directory is missing a file, corrupt, or of a newer format."""


# -- saving ----------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file (or a directory entry list) to disk, where the platform allows it."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover  (directories cannot be opened on some platforms)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _move(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (one step, so tests can interrupt a save between two)."""
    os.rename(src, dst)


def _is_saved_model(path: Path) -> bool:
    try:
        data = json.loads((path / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith(FORMAT_NAME + "/")


def _check_target(target: Path, overwrite: bool) -> None:
    if not target.exists() and not target.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(
            f"{target} already exists; pass overwrite=True to replace it (--overwrite on the command line) "
            "or choose another directory"
        )
    if target.is_symlink():
        raise FileExistsError(f"{target} is a symbolic link; refusing to replace it with a saved model (save to the "
                              f"directory it points to, {target.resolve()}, or to another path)")  # fmt: skip
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; refusing to replace it with a saved model")
    if any(target.iterdir()) and not _is_saved_model(target):
        raise FileExistsError(
            f"{target} is a directory with other content than an fxlrd saved model; refusing to replace it "
            "(overwrite=True only replaces an earlier save or an empty directory)"
        )
    others = sorted(p.name for p in target.iterdir() if p.name not in (PLAN_FILE, WEIGHTS_FILE, METADATA_FILE))
    if others:  # the save is replaced whole: files put beside it would go with it
        raise FileExistsError(
            f"{target} holds an earlier save and files fxlrd.save did not write ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); refusing to delete them with it: move them out, or save elsewhere"
        )


def _tensor_key(t: torch.Tensor) -> tuple:
    """What makes two state-dict entries the same tensor (a tie): storage, offset, shape, strides."""
    return (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _unique_tensors(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous clones of the state dict's tensors, each tied tensor once, and the aliases
    (dropped key → kept key) of the ties."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"state dict entry {key!r} is a {type(value).__name__}, not a tensor; fxlrd.save stores tensors only "
                "(a module's get_extra_state cannot be saved without pickle)"
            )
        t = value.detach()
        if t.device.type == "meta":
            raise ValueError(f"state dict entry {key!r} is on the meta device (it holds no values); nothing to save")
        if t.numel() > 0:
            ident = _tensor_key(t)
            if ident in seen:
                aliases[key] = seen[ident]
                continue
            seen[ident] = key
        tensors[key] = t.clone(memory_format=torch.contiguous_format)
    return tensors, aliases


def _devices(tensors: Mapping[str, torch.Tensor]) -> tuple[str | None, dict[str, str]]:
    """The common device of the tensors, and the tensors on another one."""
    counts: dict[str, int] = {}
    for t in tensors.values():
        counts[str(t.device)] = counts.get(str(t.device), 0) + 1
    if not counts:
        return "cpu", {}
    common = max(counts, key=counts.get)
    return common, {k: str(t.device) for k, t in tensors.items() if str(t.device) != common}


def _modes(gm: nn.Module) -> dict[str, Any]:
    """The model's train/eval flag and the modules whose flag differs from it."""
    training = gm.training
    return {"training": training, "other": sorted(n for n, m in gm.named_modules() if n and m.training != training)}


def _unsaved_buffers(gm: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """Buffers kept out of the state dict (``persistent=False``): ``(qualified name, module, name, buffer)``."""
    for prefix, module in gm.named_modules():
        for name in sorted(module._non_persistent_buffers_set):
            buffer = module._buffers.get(name)
            if buffer is not None:
                yield (f"{prefix}.{name}" if prefix else name), module, name, buffer


def _versions() -> dict[str, str]:
    import safetensors

    from . import __version__

    return {"fxlrd": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "safetensors": safetensors.__version__}  # fmt: skip


def save(gm: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a decomposed model as ``directory/{plan.json, model.safetensors, metadata.json}``.

    Everything is written into a temporary directory beside ``directory`` and renamed into
    place. With ``overwrite=True`` an earlier save is moved aside, the new one moved in, and
    only then the old one deleted: an exception at any point leaves the previous save
    loadable and no temporary directory behind.

    Args:
        gm: the ``GraphModule`` returned by `fxlrd.transform` or `fxlrd.apply` (it carries
            ``gm.fxlrd_plan``), fine-tuned or not.
        directory: the directory to create (its parents are created as needed).
        overwrite: replace an existing save (or an empty directory) at ``directory``.

    Returns:
        ``directory`` as a ``Path``.

    Raises:
        TypeError: ``gm`` carries no plan, or its state dict holds something other than tensors.
        FileExistsError: ``directory`` exists and ``overwrite`` is False, or it is not an
            earlier save (nothing is written then).
    """
    gm = uncompiled(check_module(gm, "gm"))  # torch.compile's wrapper would prefix every name with _orig_mod.
    plan = getattr(gm, "fxlrd_plan", None)
    if not isinstance(plan, Plan):
        raise TypeError(
            "fxlrd.save needs the GraphModule that fxlrd.transform or fxlrd.apply returned (it carries gm.fxlrd_plan); "
            f"got a {type(gm).__name__} without a plan"
        )
    target = Path(directory)
    _check_target(target, overwrite)
    tensors, aliases = _unique_tensors(gm.state_dict())
    common, other_devices = _devices(tensors)
    frozen = sorted(n for n, p in gm.named_parameters() if not p.requires_grad)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_files(tmp, gm, plan, tensors, {
            "aliases": aliases, "device": common, "tensor_devices": other_devices, "frozen": frozen,
            "modes": _modes(gm),
            # the model makes these again when it is built, in its own dtype: a .half() model's come back half
            "buffer_dtypes": {n: str(b.dtype).removeprefix("torch.") for n, _, _, b in _unsaved_buffers(gm)
                              if b.is_floating_point()},
        })  # fmt: skip
        _commit(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_files(tmp: Path, gm: nn.Module, plan: Plan, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    (tmp / PLAN_FILE).write_text(plan.to_json() + "\n")
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    files = {}
    for name in _HASHED_FILES:
        path = tmp / name
        _fsync(path)
        files[name] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    metadata = {
        "format": FORMAT,
        **_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model_class": type(gm).__name__,
        "capture": plan.settings.get("capture"),
        "inputs": plan.settings.get("inputs"),
        "files": files,
        "tensors": len(tensors),
        **extra,
    }
    (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
    _fsync(tmp / METADATA_FILE)
    mask = umask()  # mkdtemp (and safetensors) make private files; a save is ordinary files
    for path in tmp.iterdir():
        os.chmod(path, 0o666 & ~mask)
    os.chmod(tmp, 0o777 & ~mask)
    _fsync(tmp)


def _commit(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished save into place (see `save`)."""
    if not (overwrite and (target.exists() or target.is_symlink())):
        _move(tmp, target)
        _fsync(target.parent)
        return
    aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    _move(target, aside)
    try:
        _move(tmp, target)
    except BaseException:
        _move(aside, target)
        raise
    _fsync(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


# -- reading and checking --------------------------------------------------------------------------
def _missing_dir_message(directory: Path) -> str:
    message = f"{directory} does not exist"
    parent = directory.parent
    if parent.is_dir():
        aside = sorted(parent.glob(f".{directory.name}.old-*"))
        if aside:  # a process killed between the two renames of an overwrite
            message += f"; an earlier save was left at {aside[-1]} (rename it to {directory.name} to use it)"
    return message


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata.json`` of a saved model, with its format checked (files not hashed).

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        SavedModelError: ``directory`` is a file; the metadata is missing or unreadable, not
            an fxlrd save, holds a field of another type than save writes, or was written by
            a newer fxlrd (a format version this one cannot read).
    """
    directory = Path(directory)
    if directory.is_file():
        raise SavedModelError(f"{directory} is a file: an fxlrd save is the directory fxlrd.save wrote")
    if not directory.is_dir():
        raise FileNotFoundError(_missing_dir_message(directory))
    path = directory / METADATA_FILE
    if not path.is_file():
        raise SavedModelError(f"{path} is missing: {directory} is not a complete fxlrd saved model")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SavedModelError(f"{path} is not valid JSON ({exc}); the save is corrupt") from exc
    fmt = data.get("format") if isinstance(data, dict) else None
    name, _, version = str(fmt).rpartition("/")
    if name != FORMAT_NAME or not version.isdigit():
        raise SavedModelError(f"{path} is not fxlrd saved-model metadata (format {fmt!r}, expected {FORMAT!r})")
    if int(version) > FORMAT_VERSION:
        raise SavedModelError(
            f"{directory} was saved in format version {version} (by fxlrd {data.get('fxlrd', '?')}); this fxlrd reads "
            f"format versions up to {FORMAT_VERSION}: upgrade fxlrd to load it"
        )
    _check_metadata(data, path)
    return data


def _check_metadata(data: Mapping[str, Any], path: Path) -> None:
    """Refuse metadata whose fields are not of the types save writes (it is not hashed: an
    edited field would otherwise fail deep inside load, or load silently wrong)."""
    strings = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)  # noqa: E731
    names = lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())  # noqa: E731
    checks = {
        "files": lambda v: isinstance(v, dict) and all(
            isinstance(e, dict) and isinstance(e.get("bytes", 0), int) and isinstance(e.get("sha256", ""), str)
            for e in v.values()),  # fmt: skip
        "frozen": strings, "aliases": names, "tensor_devices": names, "buffer_dtypes": names,
        "device": lambda v: v is None or isinstance(v, str),
        "modes": lambda v: isinstance(v, dict) and isinstance(v.get("training", False), bool)
        and strings(v.get("other", [])),
    }  # fmt: skip
    for key, ok in checks.items():
        if key in data and not ok(data[key]):
            raise SavedModelError(f"{path}: field {key!r} is not what fxlrd.save writes ({type(data[key]).__name__}); "
                                  "the save is corrupt: write it again with fxlrd.save")  # fmt: skip


def verify(directory: str | os.PathLike) -> dict[str, Any]:
    """Check a saved model's metadata and every file against its recorded size and sha256.

    Returns:
        The metadata.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        SavedModelError: a file is missing, truncated or changed (the message names it), or
            the metadata is unreadable or of a newer format.
    """
    directory = Path(directory)
    meta = read_metadata(directory)
    files = meta.get("files")
    if not isinstance(files, dict) or any(not isinstance(files.get(name), dict) for name in _HASHED_FILES):
        raise SavedModelError(
            f"{directory / METADATA_FILE} does not list the hashes of {list(_HASHED_FILES)}; the save is corrupt"
        )
    for name in _HASHED_FILES:
        path, want = directory / name, files[name]
        if not path.is_file():
            raise SavedModelError(f"{path} is missing: the save is incomplete (write it again with fxlrd.save)")
        size = path.stat().st_size
        if "bytes" in want and size != want["bytes"]:
            raise SavedModelError(
                f"{path} has {size} bytes, the save recorded {want['bytes']}: the file is "
                f"{'truncated or edited' if size < want['bytes'] else 'changed'}; write the save again"
            )
        if _sha256(path) != want.get("sha256"):
            raise SavedModelError(f"{path} does not match its sha256 in {METADATA_FILE}: the file is corrupt")
    return meta


def _read_plan(directory: Path) -> Plan:
    try:
        return Plan.from_json(directory / PLAN_FILE)
    except PlanMismatchError as exc:
        raise SavedModelError(f"{directory / PLAN_FILE} is not a valid plan: {exc}") from exc


def _read_tensors(
    directory: Path, meta: Mapping[str, Any], device: str | torch.device | None
) -> dict[str, torch.Tensor]:
    """The saved state dict (aliases restored as the same tensor), on the saved devices or ``device``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / WEIGHTS_FILE
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise SavedModelError(f"{path} cannot be read as safetensors ({exc}); the file is corrupt") from exc
    common = meta.get("device") or "cpu"
    placed: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        saved_on = (meta.get("tensor_devices") or {}).get(key, common)
        where = torch.device(device if device is not None else saved_on)
        if where.type == "cuda" and not torch.cuda.is_available():
            raise SavedModelError(f"{directory} was saved with tensors on {where}, and there is no CUDA device here; "
                                  "load it with device='cpu'")  # fmt: skip
        placed[key] = t if where.type == "cpu" else t.to(where)
    for alias, key in (meta.get("aliases") or {}).items():
        if key not in placed:
            raise SavedModelError(
                f"{METADATA_FILE} ties {alias!r} to {key!r}, which {WEIGHTS_FILE} lacks; the save is corrupt"
            )
        placed[alias] = placed[key]
    return placed


# -- rebuilding ------------------------------------------------------------------------------------
def _resolve_leaves(model: nn.Module, recorded: Sequence[str]) -> list[type[nn.Module] | str]:
    """The plan records leaf modules by type name or qualified name; find them in ``model``."""
    wanted = set(recorded)
    out: list[type[nn.Module] | str] = []
    types = {type(m).__name__: type(m) for m in model.modules()}
    for name in wanted:
        if name in types:
            out.append(types[name])
        try:
            model.get_submodule(name)
            out.append(name)
        except AttributeError:
            pass
    return out


def _skeletons(gm: fx.GraphModule, plan: Plan) -> dict[str, Factorized]:
    """An empty `Factorized` (zeros, planned ranks, the layer's dtype and device) per decomposed site."""
    from .sites import find_sites

    sites = find_sites(gm)
    factors: dict[str, Factorized] = {}
    for lp in plan.decomposed:
        site = sites.get(lp.name)
        if site is None or site.spec is None:
            continue  # DecomposePass names the mismatch
        spec = site.spec
        if (spec.in_channels, spec.out_channels, spec.kernel_size) != (
            lp.in_channels, lp.out_channels, tuple(lp.kernel_size)
        ):
            continue  # likewise
        weight = site.weight(gm)
        fact = skeleton(spec, lp.method, lp.ranks, device="meta", dtype=weight.dtype, source=lp.name)
        fact = fact.to_empty(device=weight.device)
        with torch.no_grad():
            for t in [*fact.parameters(), *fact.buffers()]:
                t.zero_()  # deterministic until the saved values arrive
        factors[lp.name] = fact
    return factors


def _rebuild(
    model: nn.Module,
    plan: Plan,
    meta: Mapping[str, Any],
    example_inputs: Any,
    leaf_modules: Sequence[type[nn.Module] | str] | None,
    dynamic_shapes: Any = None,
    norms_training: bool = False,
) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Capture ``model`` as the plan records and give it the saved structure (values: zeros).
    ``norms_training``: merge as if every batch norm was in training mode (for saves from
    before the plan recorded which were)."""
    from fxlrd.passes import BranchPass, DecomposePass, MergePass

    recorded = plan.settings.get("capture") or meta.get("capture") or {}
    mode = "auto" if isinstance(model, fx.GraphModule) else recorded.get("mode", "fx")
    inputs = normalize_inputs(example_inputs)
    signature = plan.settings.get("inputs") or meta.get("inputs")
    if inputs is None and mode == "export":
        if not signature:
            raise SavedModelError(
                "the saved model was captured with torch.export but records no input signature; "
                "pass example_inputs=... (one batch the model accepts)"
            )
        inputs = _on_model_device(inputs_from_signature(signature), model)
    leaves = leaf_modules
    if leaves is None:
        leaves = _resolve_leaves(model, plan.settings.get("leaf_modules") or [])
    if mode == "export":  # (torch.export traces into every module)
        leaves = ()
    # an export graph runs as the model ran at capture: capture the copy in the recorded mode
    # (eval for saves from before it was recorded), whatever mode the model given is in
    training = bool(recorded.get("training", False)) if mode == "export" else None
    warn_dynamic_shapes(recorded, dynamic_shapes, "fxlrd.load(model, directory, dynamic_shapes=...)")

    def captured_with(inputs_: Any) -> Any:
        return capture(model, inputs=inputs_, mode=mode, leaf_modules=leaves, dynamic_shapes=dynamic_shapes,
                       attention=plan.settings.get("attention", "packed"), copy_model=True,
                       training=training, widen=widens(recorded))  # fmt: skip

    try:
        try:
            captured = captured_with(inputs)
        except ValueError:
            cast = _like_model(inputs, model) if example_inputs is None and inputs is not None else inputs
            if _same_dtypes(cast, inputs):
                raise
            captured = captured_with(cast)  # the model cast after the save: its inputs in its dtype
    except ValueError as exc:  # the recorded inputs do not fit: the save is of another model
        if example_inputs is not None:
            raise
        raise PlanMismatchError(
            f"the saved model's inputs do not fit this {type(model).__name__} ({str(exc).splitlines()[0]}); "
            f"it was saved from a {meta.get('model_class', 'different model')}: "
            "load it into the model fxlrd.transform was given"
        ) from exc
    gm = captured.gm
    if plan.settings.get("narrowed"):
        from .narrow import narrow_skeleton

        narrow_skeleton(gm, plan.settings["narrowed"])
    if plan.settings.get("fused"):
        from .siblings import fuse_siblings

        fuse_siblings(gm, plan.settings["fused"])
    if plan.settings.get("stacked_experts"):
        from .experts import factorize_experts

        factorize_experts(model, gm, plan.settings["stacked_experts"], skeleton=True)
    gm = DecomposePass(plan, factors=_skeletons(gm, plan))(gm).graph_module
    branches = int(plan.settings.get("branches", 1) or 1)
    if branches > 1:  # the saved values replace the truncated blocks: no fitting needed
        gm = BranchPass(branches, "truncate")(gm).graph_module
    if plan.settings.get("merge"):
        from .modes import eval_mode
        from .planner import input_shapes

        # a norm folds into a linear layer only where its input shape says it can (2-D): the
        # shapes merging read when the model was made, from the inputs or their recorded signature
        shapes_from = inputs if inputs is not None else (inputs_from_signature(signature) if signature else None)
        norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
        if norms and shapes_from is not None and not any("tensor_meta" in n.meta or "val" in n.meta
                                                         for n in gm.graph.nodes if n.op == "call_module"):  # fmt: skip
            # (the recorded signature's inputs are made on the CPU; a model cast after the save takes its dtype)
            for attempt in (_on_model_device(shapes_from, gm), _like_model(shapes_from, gm)):
                try:
                    input_shapes(gm, attempt)
                    break
                except Exception:  # noqa: BLE001  (best effort: without shapes no norm folds into a linear layer)
                    continue
        with eval_mode(gm):  # the structure only (the saved values replace the folded ones), in any mode
            for name in plan.settings.get("merge_training_norms") or ():  # but as merging saw each norm
                with contextlib.suppress(AttributeError):
                    gm.get_submodule(name).training = True
            if norms_training:
                for m in gm.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.training = True
            gm = MergePass(plan.settings["merge"], rule=int(plan.settings.get("merge_rule", 1)))(gm).graph_module
    return gm, recorded or captured.record()


def _put(gm: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Register ``tensor`` as the parameter or buffer at state-dict ``key``."""
    owner, _, leaf = key.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    (module._parameters if leaf in module._parameters else module._buffers)[leaf] = tensor


def _on_model_device(inputs: Any, model: nn.Module) -> Any:
    """Inputs made from a recorded signature (on the CPU) on the device of ``model``'s
    parameters (a model built on the meta device is captured with meta inputs)."""
    device = next((p.device for p in model.parameters()), None)
    if device is None or device.type == "cpu":
        return inputs
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, inputs)


def _like_model(inputs: Any, model: nn.Module) -> Any:
    """`_on_model_device`, and floating inputs in the model's floating dtype where it has one
    (a model cast after the save captures as it runs; the save's dtype comes back on load)."""
    inputs = _on_model_device(inputs, model)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        return inputs
    (dtype,) = dtypes
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, inputs)


def _same_dtypes(a: Any, b: Any) -> bool:
    """Whether two input structures hold tensors of the same dtypes."""
    dtypes = lambda x: [t.dtype for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]  # noqa: E731
    return dtypes(a) == dtypes(b)


def _check_dtype(gm: fx.GraphModule, mode: str, model_dtypes: set[torch.dtype], signature: Any) -> None:
    """A torch.export capture bakes casts in for the dtype the model ran in (a Llama's RMSNorm
    computes in float32 and casts back to it): loaded with parameters of another floating
    dtype, such a graph fails at its first call. When the save's dtype is not the model's, the
    loaded graph is run once on the recorded input signature (floating inputs in the save's
    dtype); a failure is a `SavedModelError` saying to cast the model first."""
    saved = {p.dtype for p in gm.parameters() if p.is_floating_point()}
    if mode != "export" or not signature or len(saved) != 1 or len(model_dtypes) != 1 or saved == model_dtypes:
        return
    (want,), (have,) = saved, model_dtypes
    args, kwargs = _on_model_device(inputs_from_signature(signature), gm)
    args, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.to(want) if t.is_floating_point() else t, (args, kwargs))
    buffers = {k: v.clone() for k, v in gm.named_buffers()}  # a training-mode graph updates its norms' statistics
    try:
        with torch.no_grad():
            gm(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001  (whatever the baked-in casts make the graph raise)
        if not re.search(r"dtype|scalar type|Half|BFloat16|Float|Double", str(exc)):
            return  # not the dtypes (zeros the model does not take, say): the model's own first call will tell
        raise SavedModelError(
            f"the save holds {str(want).removeprefix('torch.')} parameters and the model given is "
            f"{str(have).removeprefix('torch.')}: its torch.export capture runs in the dtype it is captured in, and the "
            f"loaded graph fails ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); cast the model first, "
            f"fxlrd.load(model.to({want}), ...)"
        ) from exc
    finally:
        with torch.no_grad():
            for k, v in gm.named_buffers():
                if k in buffers and v.shape == buffers[k].shape:
                    v.copy_(buffers[k])


def _check_fits(gm: nn.Module, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """A `PlanMismatchError` listing what differs between the rebuilt model and the saved tensors."""
    expected = gm.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [f"{k} {list(tensors[k].shape)} saved, {list(v.shape)} here" for k, v in expected.items()
              if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]  # fmt: skip
    if not (missing or unexpected or shapes):
        return
    parts = []
    for what, items in (("missing from the save", missing), ("saved but not in the model", unexpected),
                        ("of other shapes", shapes)):  # fmt: skip
        if items:
            parts.append(f"{len(items)} {what} ({', '.join(items[:4])}{', ...' if len(items) > 4 else ''})")
    saved_from = meta.get("model_class")
    raise PlanMismatchError(
        f"the saved model does not fit this {type(gm).__name__}: tensors " + "; ".join(parts)
        + (f". It was saved from a {saved_from}" if saved_from and saved_from != type(gm).__name__ else "")
        + ". Load it into the model fxlrd.transform was given (same architecture); a save records the plan's "
        "passes only, not graph changes made by hand afterwards"
    )


def _move_unsaved_buffers(gm: nn.Module, devices: set[torch.device], dtypes: Mapping[str, str] | None = None) -> None:
    """Buffers kept out of the state dict (BERT's position ids, an exported graph's device
    anchor) go where the saved tensors went, when those all went to one device, and take the
    floating dtype they had when saved."""
    device = next(iter(devices)) if len(devices) == 1 else None
    for qualified, module, name, buffer in list(_unsaved_buffers(gm)):
        if buffer.is_meta:  # it holds no values
            continue
        dtype = getattr(torch, (dtypes or {}).get(qualified, ""), None) if buffer.is_floating_point() else None
        moved = device is not None and buffer.device != device
        if moved or (isinstance(dtype, torch.dtype) and buffer.dtype != dtype):
            module._buffers[name] = buffer.to(device=device or buffer.device, dtype=dtype or buffer.dtype)


def load(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    example_inputs: Any = None,
    leaf_modules: Sequence[type[nn.Module] | str] | None = None,
    device: str | torch.device | None = None,
    dynamic_shapes: Any = None,
) -> fx.GraphModule:
    """Load a model saved by `save` onto ``model``, without decomposing again.

    ``model`` is the original (undecomposed) model the save was made from, or any model of
    the same architecture; its weights are not used and it is never modified. The result
    equals the saved model bitwise (state dict and outputs).

    Args:
        model: the original ``nn.Module``.
        directory: the saved model's directory.
        example_inputs: for a model captured with torch.export: inputs to capture it with
            (default: zeros of the recorded input signature).
        leaf_modules: the leaf modules the model needs to be traced (default: those the plan
            records, looked up in ``model`` by type name or qualified name).
        device: put every tensor there (default: where each was when saved).
        dynamic_shapes: for a model captured with torch.export and the caller's
            ``dynamic_shapes``: the same again (a plan records that they were given, not them).

    Returns:
        The decomposed ``GraphModule`` with ``gm.fxlrd_plan`` and ``gm.fxlrd_capture``, in
        the train/eval mode it was saved in.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        SavedModelError: a file is missing, truncated or changed, or of a newer format.
        PlanMismatchError: the save does not fit ``model`` (another architecture).
        CaptureError: ``model`` cannot be captured the way the save records.
    """
    model = uncompiled(check_module(model))  # a torch.compile wrapper: its module
    directory = Path(directory)
    meta = verify(directory)
    plan = _read_plan(directory)
    tensors = _read_tensors(directory, meta, device)
    model_dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    gm, capture_record = _rebuild(model, plan, meta, example_inputs, leaf_modules, dynamic_shapes)
    # A buffer the model keeps out of its state dict (persistent=False) is in a save of a
    # deep copy or a torch.load of the model (they register a GraphModule's own buffers again
    # as persistent): the rebuilt model makes its own, as the model does.
    unsaved = {f"{name}.{b}" if name else b for name, m in gm.named_modules() for b in m._non_persistent_buffers_set}
    tensors = {k: v for k, v in tensors.items() if k not in unsaved}
    try:
        _check_fits(gm, tensors, meta)
    except PlanMismatchError as mismatch:
        # A save from before plans recorded which norms merging saw in training mode, merged
        # approximately in training mode, kept norms that an eval-mode merge folds: try that.
        if not plan.settings.get("merge") or "merge_training_norms" in plan.settings:
            raise
        retry, record = _rebuild(model, plan, meta, example_inputs, leaf_modules, dynamic_shapes, norms_training=True)
        try:
            _check_fits(retry, tensors, meta)
        except PlanMismatchError:
            raise mismatch from None  # the mismatch as the plan records it
        gm, capture_record = retry, record
    with torch.no_grad():
        replaced: dict[int, torch.Tensor] = {}  # meta tensors given a real one in their place (ties kept)
        for key, current in gm.state_dict(keep_vars=True).items():
            saved = tensors[key]
            if id(current) in replaced:
                _put(gm, key, replaced[id(current)])
            elif current.is_meta and not saved.is_meta:  # a skeleton on the meta device: .data cannot change device kind
                new = type(current)(torch.empty_like(saved), current.requires_grad) if isinstance(current, nn.Parameter) \
                    else torch.empty_like(saved)  # fmt: skip
                try:
                    torch.utils.swap_tensors(current, new)
                except RuntimeError:  # (a weak reference to it: an export graph's) the module gets the new one
                    replaced[id(current)] = new
                    _put(gm, key, new)
            elif (current.dtype, current.device) != (saved.dtype, saved.device):
                current.data = torch.empty_like(saved)  # same object (ties kept), saved dtype and device
    gm.load_state_dict(tensors, strict=True)
    _move_unsaved_buffers(gm, {t.device for t in tensors.values()}, meta.get("buffer_dtypes") or {})
    still_meta = [n for n, t in [*gm.named_parameters(), *gm.named_buffers()] if t.is_meta]
    if still_meta:  # only what the save does not hold: a buffer the model computes at construction
        raise SavedModelError(
            f"{still_meta[0]!r} is on the meta device and not in the save (the model makes it when it is built, e.g. "
            "BERT's position ids): build the model on a real device (its weights are not used, only its structure)"
        )
    frozen = set(meta.get("frozen") or ())
    for name, p in gm.named_parameters():  # tied parameters once, under the name save recorded
        p.requires_grad_(name not in frozen)
    modes = meta.get("modes") or {}
    gm.train(bool(modes.get("training", gm.training)))
    for name in modes.get("other", ()):
        try:
            module = gm.get_submodule(name)
        except AttributeError:
            continue
        module.training = not gm.training
    _check_dtype(gm, capture_record.get("mode", ""), model_dtypes, plan.settings.get("inputs") or meta.get("inputs"))
    gm.fxlrd_plan = plan
    gm.fxlrd_capture = dict(capture_record)
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {}).update(fxlrd_plan=plan, fxlrd_capture=gm.fxlrd_capture)
    return gm
