"""PrecisionPlan: the storage format of every unit (decoder layer) of a pruned model, as data.

A plan can be saved (:meth:`to_dict`, versioned), loaded (:meth:`from_dict`), compared and applied
again (:func:`qpruner.quantize.quantize_`). Formats: ``nf4`` / ``fp4`` (4-bit, bitsandbytes
``Linear4bit``), ``int8`` (bitsandbytes ``Linear8bitLt``), ``bf16`` (16-bit storage).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PlanError

FORMAT_BITS = {"nf4": 4, "fp4": 4, "int8": 8, "bf16": 16}
PLAN_VERSION = 1


def format_for_bits(bits: int, four_bit: str = "nf4") -> str:
    if bits == 4:
        return four_bit
    if bits == 8:
        return "int8"
    if bits == 16:
        return "bf16"
    raise PlanError(f"unsupported bit width {bits}; expected 4, 8 or 16")


@dataclass(frozen=True)
class PrecisionPlan:
    formats: tuple[str, ...]      # one per unit
    unit: str = "layer"

    def __post_init__(self):
        if not isinstance(self.formats, tuple):
            object.__setattr__(self, "formats", tuple(self.formats))
        bad = sorted({f for f in self.formats if f not in FORMAT_BITS})
        if bad:
            raise PlanError(f"unknown format(s) {bad}; expected one of {sorted(FORMAT_BITS)}")
        if not self.formats:
            raise PlanError("a plan needs at least one unit")
        if self.unit != "layer":
            raise PlanError(f"unit {self.unit!r} is not supported yet; expected 'layer'")

    @classmethod
    def from_bits(cls, bits, four_bit: str = "nf4") -> "PrecisionPlan":
        return cls(tuple(format_for_bits(int(b), four_bit) for b in bits))

    @classmethod
    def uniform(cls, fmt: str, n_units: int) -> "PrecisionPlan":
        return cls((fmt,) * n_units)

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(FORMAT_BITS[f] for f in self.formats)

    def __len__(self) -> int:
        return len(self.formats)

    def code(self) -> str:
        """Compact text form, one character per unit: 4 = nf4, f = fp4, 8 = int8, H = bf16."""
        return "".join({"nf4": "4", "fp4": "f", "int8": "8", "bf16": "H"}[f] for f in self.formats)

    def check_units(self, n_units: int) -> None:
        if len(self.formats) != n_units:
            raise PlanError(f"plan has {len(self.formats)} entries but the pruned model has {n_units} "
                            "decoder layers; re-run scoring after pruning")

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "unit": self.unit, "formats": list(self.formats)}

    @classmethod
    def from_dict(cls, d: dict) -> "PrecisionPlan":
        if not isinstance(d, dict) or "formats" not in d:
            raise PlanError(f"not a plan: expected a dict with 'version' and 'formats', got {d!r}")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {d.get('version')!r} is not supported; expected {PLAN_VERSION}")
        return cls(tuple(d["formats"]), d.get("unit", "layer"))
