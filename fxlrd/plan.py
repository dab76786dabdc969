"""The plan: per layer, how it is decomposed (method, ranks) or why it is kept.

A plan is plain data, separate from the rewrite: it prints as a table, can be edited, and
round-trips through JSON, so it can be saved and applied again later.
"""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Mapping

from ._files import write_text
from .errors import PlanMismatchError

__all__ = ["LayerPlan", "Plan"]

_FORMAT = "fxlrd.plan/1"


@dataclass
class LayerPlan:
    """How one layer is treated.

    ``method`` is a registered method (`fxlrd.methods`) or ``"keep"``. ``ranks`` is ``(r,)``
    for SVD and CP and ``(r1, r2)`` (input side, output side) for Tucker-2; a rank equal to
    its side's size means that side keeps no factor. ``site`` says how the layer appears in
    the graph (``"module"`` or ``"function"``); ``data_aware`` that its factors are fitted to
    calibration data (input whitening); ``error`` the estimated relative squared error
    (of the weight, or of the output on calibration data when data-aware).
    """

    name: str
    layer_type: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    method: str
    ranks: tuple[int, ...] = ()
    reason: str = ""
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    input_shape: tuple[int, ...] | None = None
    latency: dict[str, Any] | None = None  # the latency search's record: timings, choice, note
    site: str = "module"
    data_aware: bool = False
    error: float | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        from .methods import get_method, methods

        if self.method != "keep" and self.method not in methods():
            raise PlanMismatchError(
                f"layer {self.name!r}: method must be one of {(*methods(), 'keep')}, got {self.method!r}"
            )
        self.kernel_size = tuple(self.kernel_size)
        if not isinstance(self.ranks, (list, tuple)) or not all(  # 16.0 from another tool is 16; 2.7 is no rank
                isinstance(r, numbers.Real) and not isinstance(r, bool) and float(r).is_integer() for r in self.ranks):  # fmt: skip
            raise PlanMismatchError(f"layer {self.name!r}: ranks must be a list of ints, got {self.ranks!r}")
        self.ranks = tuple(int(r) for r in self.ranks)
        if self.input_shape is not None:
            self.input_shape = tuple(self.input_shape)
        if self.method != "keep":
            want = get_method(self.method).n_ranks
            if len(self.ranks) != want or any(r < 1 for r in self.ranks):
                raise PlanMismatchError(
                    f"layer {self.name!r}: {self.method} needs {want} rank(s) >= 1, got {self.ranks}"
                )

    @property
    def decomposed(self) -> bool:
        return self.method != "keep"


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _ratio(before: int | None, after: int | None) -> str:
    return f"{before / after:.2f}x" if before and after else "-"


@dataclass
class Plan:
    """The decomposition plan of a model: `LayerPlan` by qualified name, in graph order."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    model_params: int | None = None

    def __iter__(self) -> Iterator[LayerPlan]:
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerPlan:
        return self.layers[name]

    @property
    def decomposed(self) -> list[LayerPlan]:
        return [lp for lp in self if lp.decomposed]

    def params_after_model(self) -> int | None:
        """Parameters of the whole model after decomposition (needs ``model_params``)."""
        if self.model_params is None:
            return None
        narrowed = sum(b["params_before"] - b["params_after"] for b in self.settings.get("narrowed") or ())
        merged = int(self.settings.get("merge_params_change") or 0)  # what merging added (< 0: removed)
        stacked = sum(r["params_before"] - r["params_after"] for r in self.settings.get("stacked_experts") or ())
        return self.model_params - narrowed - stacked - sum(lp.params_before - lp.params_after for lp in self.decomposed) + merged

    def totals(self) -> dict[str, int | None]:
        """Sums over all planned layers (kept layers count the same before and after)."""
        def total(attr: str) -> int | None:
            values = [getattr(lp, attr) for lp in self]
            return None if any(v is None for v in values) else sum(values)

        return {k: total(k) for k in ("params_before", "params_after", "macs_before", "macs_after")}

    def table(self) -> str:
        """The plan as a fixed-width text table with a totals line."""
        head = ("layer", "type", "C->S", "kernel", "method", "ranks", "params", "MACs", "note")
        # a narrowed block's layers are planned on the narrowed graph: their rows show the shape
        # before narrowing, as every row does (the note gives the neurons kept)
        hidden = {}
        for block in self.settings.get("narrowed") or []:
            hidden[block["up"]], hidden[block["down"]] = ("out", block["hidden"]), ("in", block["hidden"])
            if block.get("partner"):  # a gated block's second input layer
                hidden[block["partner"]] = ("out", block["hidden"])
            hidden |= {name: ("both", block["hidden"]) for name in block.get("depthwise") or ()}
            for reduce, expand in block.get("squeeze") or ():
                hidden[reduce], hidden[expand] = ("in", block["hidden"]), ("out", block["hidden"])
        rows = []
        for lp in self:
            kernel = "x".join(map(str, lp.kernel_size)) or "-"
            after_p, after_m = lp.params_after, lp.macs_after  # a kept layer's are its own (a narrowed one's less)
            side, h = hidden.get(lp.name, (None, None))
            shape = f"{h if side in ('in', 'both') else lp.in_channels}->{h if side in ('out', 'both') else lp.out_channels}"
            rows.append((
                lp.name, lp.layer_type, shape, kernel, lp.method,
                ",".join(map(str, lp.ranks)) or "-",
                f"{_count(lp.params_before)}->{_count(after_p)}",
                f"{_count(lp.macs_before)}->{_count(after_m)}" if lp.macs_before is not None else "-",
                lp.reason or lp.notes or (lp.latency or {}).get("note", ""),
            ))  # fmt: skip
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
        out = [line(head), line(["-" * w for w in widths]), *map(line, rows)]
        t = self.totals()
        n_by: dict[str, int] = {}
        for lp in self:
            n_by[lp.method] = n_by.get(lp.method, 0) + 1
        kept = n_by.pop("keep", 0)
        out.append(
            f"{len(self)} layers: " + "".join(f"{n} {m}, " for m, n in n_by.items()) + f"{kept} kept; "
            f"layer params {_count(t['params_before'])} -> {_count(t['params_after'])} "
            f"({_ratio(t['params_before'], t['params_after'])})"
            + (
                f"; layer MACs {_count(t['macs_before'])} -> {_count(t['macs_after'])} "
                f"({_ratio(t['macs_before'], t['macs_after'])})"
                if t["macs_before"] is not None
                else ""
            )
        )
        narrowed = self.settings.get("narrowed") or []
        if narrowed:
            before, after = sum(b["params_before"] for b in narrowed), sum(b["params_after"] for b in narrowed)
            hidden = ", ".join(f"{b['hidden']}->{b['width']}" for b in narrowed)
            out.append(f"{len(narrowed)} MLP blocks narrowed (hidden {hidden}): params {_count(before)} -> {_count(after)} "
                       f"({_ratio(before, after)}), in the rows and totals above")  # fmt: skip
        fused = self.settings.get("fused") or []
        if fused:
            leaves = sorted({"+".join(m.rpartition(".")[2] for m in g["members"]) for g in fused})
            out.append(f"{len(fused)} groups of sibling linears fused before decomposition ({', '.join(leaves)}): "
                       "each row above named after its members")  # fmt: skip
        stacked = self.settings.get("stacked_experts") or []
        if stacked:
            before, after = sum(r["params_before"] for r in stacked), sum(r["params_after"] for r in stacked)
            n = sum(r["rank"] is not None for r in stacked)
            aware = sum(bool(r.get("data_aware")) and r["rank"] is not None for r in stacked)
            out.append(f"{len(stacked)} stacked expert weights, not in the rows above ({n} factorized per expert, {aware} "
                       f"of them data-aware; {len(stacked) - n} kept): params {_count(before)} -> {_count(after)} "
                       f"({_ratio(before, after)})")  # fmt: skip
            width = max(len(r["weight"]) for r in stacked)
            for r in stacked:
                shape = f"{r['experts']}x{r['shape'][0]}x{r['shape'][1]}"
                if r["rank"] is None:
                    what = f"kept: {r['reason']}"
                else:
                    error = (f"output error {r['error']:.3f} ({r.get('calibrated_experts')} of {r['experts']} experts "
                             "calibrated)" if r.get("data_aware") else f"weight error {r['error']:.3f}")
                    what = f"rank {r['rank']}, params {_count(r['params_before'])}->{_count(r['params_after'])}, {error}"
                    what += _stack_timing(r.get("latency"))
                    what += f"; {r['note']}" if r.get("note") else ""
                out.append(f"  {r['weight'].ljust(width)}  {shape}  {what}")
        change = self.settings.get("merge_params_change")
        if change:
            out.append(f"merging ({self.settings.get('merge')}) then changed the model's params by {change:+,}; the rows "
                       "above are the layers as decomposed, before merging")  # fmt: skip
        if self.model_params is not None:
            after = self.params_after_model()
            out.append(f"model params {_count(self.model_params)} -> {_count(after)} ({_ratio(self.model_params, after)})")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "settings": self.settings,
            "model_params": self.model_params,
            "layers": [asdict(lp) for lp in self],
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The plan as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            write_text(path, text + "\n")  # atomic: an earlier plan is replaced whole or not at all
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise PlanMismatchError(
                f"not an fxlrd plan (expected a JSON object with format {_FORMAT!r}); "
                "make one with fxlrd.plan(model).to_json()"
            )
        names = {f.name for f in fields(LayerPlan)}
        layers = {}
        entries = data.get("layers", [])
        if not isinstance(entries, list):
            raise PlanMismatchError(f"plan 'layers' must be a list of layer entries, got {type(entries).__name__}")
        for item in entries:
            if not isinstance(item, dict):
                raise PlanMismatchError(f"plan layer entry must be a JSON object, got {item!r}")
            unknown = set(item) - names
            if unknown:
                raise PlanMismatchError(f"plan layer entry has unknown keys {sorted(unknown)}: {item}")
            try:
                lp = LayerPlan(**item)
            except TypeError as exc:
                raise PlanMismatchError(f"plan layer entry is incomplete ({exc}): {item}") from exc
            if lp.name in layers:
                raise PlanMismatchError(f"plan names layer {lp.name!r} twice")
            layers[lp.name] = lp
        return cls(layers=layers, settings=dict(data.get("settings", {})), model_params=data.get("model_params"))

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> "Plan":
        """Read a plan from JSON text or from a file path."""
        text = str(source)
        looks_like_json = isinstance(source, str) and (not text.strip() or text.lstrip()[0] in "{[\"" or
                                                       text.strip() in ("null", "true", "false"))  # fmt: skip
        if not looks_like_json:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"no plan file {path} (Plan.from_json takes JSON text or a file path)")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise PlanMismatchError(f"{path} is not a plan: it is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanMismatchError(f"plan is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def _stack_timing(latency: Mapping[str, Any] | None) -> str:
    """``", its product 0.543 ms (dense 0.701 ms)"``: a searched stack's timings at its rank, for the table."""
    if not latency or not latency.get("chosen") or not latency.get("original_ms"):
        return ""
    at = next((c[1] for c in latency.get("candidates_ms") or () if list(c[0]) == list(latency["chosen"])), None)
    return "" if at is None else f", its product {at:.3f} ms (dense {latency['original_ms']:.3f} ms)"
