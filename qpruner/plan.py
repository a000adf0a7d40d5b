"""PrecisionPlan: the storage format of every unit of a pruned model, as data.

A *unit* is what gets one precision: a whole decoder layer (``layer``, the default), one of its two
module groups (``group``: attention q/k/v/o, then MLP gate/up/down), or a single projection
(``linear``). Units are numbered layer by layer in that order. A plan can be saved
(:meth:`to_dict`, versioned), loaded (:meth:`from_dict`), compared and applied again
(:func:`qpruner.quantize.quantize_`). Formats: ``nf4`` / ``fp4`` (4-bit, bitsandbytes
``Linear4bit``), ``int8`` (bitsandbytes ``Linear8bitLt``), ``bf16`` (16-bit storage).

In a joint search (``prune.param_ratios``) a plan also names the pruned model it applies to:
``pruned`` is that model's pruning amount (fraction of all parameters removed); ``None`` means the
job's one pruned model. :meth:`PrecisionPlan.key` is the one text identity of a plan (trial tables,
caches, searchers); plans are also hashable and compare equal exactly when their keys do.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import LINEAR_NAMES
from .errors import PlanError

FORMAT_BITS = {"nf4": 4, "fp4": 4, "int8": 8, "bf16": 16}
PLAN_VERSION = 1
ATTENTION = LINEAR_NAMES[:4]
MLP = LINEAR_NAMES[4:]
UNIT_MEMBERS = {  # the linears of each unit of one layer, in unit order
    "layer": (LINEAR_NAMES,),
    "group": (ATTENTION, MLP),
    "linear": tuple((name,) for name in LINEAR_NAMES),
}
UNITS = tuple(UNIT_MEMBERS)


def format_for_bits(bits: int, four_bit: str = "nf4") -> str:
    """The storage format for a bit width (4: the job's 4-bit format, 8: int8, 16: bf16)."""
    if bits == 4:
        return four_bit
    if bits == 8:
        return "int8"
    if bits == 16:
        return "bf16"
    raise PlanError(f"unsupported bit width {bits}; expected 4, 8 or 16")


def units_per_layer(unit: str) -> int:
    """How many precision units one decoder layer has for ``unit``."""
    if unit not in UNIT_MEMBERS:
        raise PlanError(f"unknown unit {unit!r}; expected one of {list(UNITS)}")
    return len(UNIT_MEMBERS[unit])


@dataclass(frozen=True)
class PrecisionPlan:
    """The format of every unit of a pruned model (and, in a joint search, which pruned model)."""
    formats: tuple[str, ...]      # one per unit
    unit: str = "layer"
    pruned: float | None = None   # joint search: the pruning amount of the model it applies to

    def __post_init__(self):
        if not isinstance(self.formats, tuple):
            object.__setattr__(self, "formats", tuple(self.formats))
        bad = sorted({f for f in self.formats if f not in FORMAT_BITS})
        if bad:
            raise PlanError(f"unknown format(s) {bad}; expected one of {sorted(FORMAT_BITS)}")
        if not self.formats:
            raise PlanError("a plan needs at least one unit")
        units_per_layer(self.unit)
        if self.pruned is not None:
            amount = float(self.pruned)
            if not 0.0 <= amount < 1.0:
                raise PlanError(f"pruned: expected a pruning amount in [0, 1), got {self.pruned!r}")
            object.__setattr__(self, "pruned", round(amount, 6))   # 0.1 and 0.1000000001 are one model

    @classmethod
    def from_bits(cls, bits, four_bit: str = "nf4", unit: str = "layer", pruned: float | None = None) -> "PrecisionPlan":
        return cls(tuple(format_for_bits(int(b), four_bit) for b in bits), unit, pruned)

    @classmethod
    def uniform(cls, fmt: str, n_units: int, unit: str = "layer", pruned: float | None = None) -> "PrecisionPlan":
        return cls((fmt,) * n_units, unit, pruned)

    def key(self) -> str:
        """The plan's identity as text: its formats, comma-joined, and ``@<amount>`` in a joint search."""
        text = ",".join(self.formats)
        return text if self.pruned is None else f"{text}@{self.pruned:g}"

    @classmethod
    def from_key(cls, key: str, unit: str = "layer") -> "PrecisionPlan":
        formats, _, amount = key.partition("@")
        return cls(tuple(formats.split(",")), unit, float(amount) if amount else None)

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(FORMAT_BITS[f] for f in self.formats)

    def __len__(self) -> int:
        return len(self.formats)

    def code(self) -> str:
        """Compact text form, one character per unit: 4 = nf4, f = fp4, 8 = int8, H = bf16; in a joint
        search prefixed with the pruning amount in percent (``p20-44448888``)."""
        code = "".join({"nf4": "4", "fp4": "f", "int8": "8", "bf16": "H"}[f] for f in self.formats)
        return code if self.pruned is None else f"p{100 * self.pruned:g}-{code}"

    def n_layers(self) -> int:
        return len(self.formats) // units_per_layer(self.unit)

    def check_units(self, n_layers: int) -> None:
        """Raise unless the plan has exactly one entry per unit of a model with ``n_layers`` layers."""
        want = n_layers * units_per_layer(self.unit)
        if len(self.formats) != want:
            raise PlanError(f"plan has {len(self.formats)} entries but the pruned model has {want} "
                            f"{self.unit} units ({n_layers} decoder layers); re-run scoring after pruning")

    def per_linear(self) -> list[dict[str, str]]:
        """For each decoder layer, the format of each of its seven linears (by short name)."""
        members = UNIT_MEMBERS[self.unit]
        out = []
        for layer in range(self.n_layers()):
            formats = {}
            for k, names in enumerate(members):
                for name in names:
                    formats[name] = self.formats[layer * len(members) + k]
            out.append(formats)
        return out

    def to_dict(self) -> dict:
        d = {"version": PLAN_VERSION, "unit": self.unit, "formats": list(self.formats)}
        if self.pruned is not None:
            d["pruned"] = self.pruned
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PrecisionPlan":
        if not isinstance(d, dict) or "formats" not in d:
            raise PlanError(f"not a plan: expected a dict with 'version' and 'formats', got {d!r}")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {d.get('version')!r} is not supported; expected {PLAN_VERSION}")
        return cls(tuple(d["formats"]), d.get("unit", "layer"), d.get("pruned"))
