"""Figures of a benchmark run, printed as they come and, with ``--json FILE``,
written as data: each figure with its unit, and where there is one its floor
measured in the same run and the ratio, so two versions can be compared.
Several modules may write to one file: each keeps its own section."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Figure", "Report"]


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    floor: float | None = None
    floor_name: str | None = None
    ratio: float | None = None
    note: str | None = None


@dataclass
class Report:
    bench: str
    figures: list[Figure] = field(default_factory=list)

    def add(
        self,
        name: str,
        value: float,
        unit: str,
        *,
        floor: float | None = None,
        floor_name: str | None = None,
        note: str | None = None,
    ) -> Figure:
        ratio = round(value / floor, 3) if floor else None
        figure = Figure(name, round(value, 3), unit, floor and round(floor, 3), floor_name, ratio)
        figure.note = note
        self.figures.append(figure)
        line = f"  {name}: {value:,.2f} {unit}"
        if floor:
            line += f"   ({floor_name or 'floor'} {floor:,.2f} {unit}, ratio {ratio:.2f})"
        if note:
            line += f"   [{note}]"
        print(line, flush=True)
        return figure

    def write(self, path: str) -> None:
        """Merge this run's section into ``path`` (created if missing)."""
        target = Path(path)
        doc = json.loads(target.read_text()) if target.exists() else {}
        doc.setdefault("machine", {"cpus": os.cpu_count(), "python": platform.python_version()})
        doc.setdefault("benches", {})[self.bench] = {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "figures": [asdict(f) for f in self.figures],
        }
        target.write_text(json.dumps(doc, indent=2) + "\n")
