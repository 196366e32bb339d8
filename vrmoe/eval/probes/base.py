"""The probe contract: one concern of ``vrmoe eval``, one block of ``eval.json``.

A probe is a class registered with :func:`register_probe` in a module of this
package (every module here is imported). It gets the shared
:class:`~vrmoe.eval.context.EvalContext` and returns its block; it names the
numbers worth a glance (the W&B summary), the figures it draws into the run dir,
and prints itself. ``evaluate_run`` loops over the probes in ``order`` and
knows none of them by name.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    from ..context import EvalContext


class Probe:
    name: ClassVar[str]  # its block's key in eval.json
    order: ClassVar[int]  # where it runs and prints among the probes

    def measure(self, ctx: "EvalContext") -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def headline(self, block: dict[str, Any]) -> dict[str, Any]:
        """The block's numbers worth a glance (no per-sequence lists or bins)."""
        return {self.name: block}

    def figures(self, block: dict[str, Any], run_dir: Path) -> dict[str, Callable[[], Path]]:
        """name -> a function that draws one figure into ``run_dir`` and returns its path."""
        return {}

    def show(self, block: dict[str, Any], result: dict[str, Any]) -> None:
        """Print the block for a person (rich tables on stderr); ``result`` is the whole eval.json."""


PROBES: dict[str, Probe] = {}


def register_probe(cls: type[Probe]) -> type[Probe]:
    PROBES[cls.name] = cls()
    return cls


def ordered_probes() -> list[Probe]:
    return sorted(PROBES.values(), key=lambda p: p.order)


def per_item(probs_NC: Any) -> list[list[float]]:
    """Per-item probabilities for eval.json: 6 significant digits, so that a small probability of the
    true answer keeps its NLL (a fixed number of decimals would round it to 0)."""
    return [[float(f"{p:.6g}") for p in row] for row in probs_NC.double().tolist()]


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a console table: 3 decimals, "-" for a missing or NaN value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"
