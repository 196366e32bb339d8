"""The multiple-choice items each set scores, and what was left out: the ``items`` block.

Per set ("in" the test split, "calibration" the split temperature scaling fits on, and each
multiple-choice OOD set): ``items`` scored, ``unlabelled`` of them without an answer (scored for
OOD, left out of calibration and accuracy) and ``too_long``, prompts longer than ``prompt_len``
tokens that were left out; for "calibration", ``skipped_trained_on``: the split's first items,
which the run trained on (post-hoc heads), are not among them. ``prompt_len`` is the longest
prompt scored: model.seq_len for the native model, the pretrained model's own context for
model=hf.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...console import log_line
from ..context import prompt_len
from ..schema import ITEM_SETS_KEY
from .base import Probe, register_probe

if TYPE_CHECKING:  # pragma: no cover
    from ..context import EvalContext


def counts_line(block: dict[str, Any]) -> str:
    """The block as one console line, e.g. ``in 500, medmcqa 6150 (6150 without an answer, OOD
    scores only)``."""
    parts = []
    for name, counts in block[ITEM_SETS_KEY].items():
        notes = []
        if counts.get("skipped_trained_on"):
            notes.append(f"after the {counts['skipped_trained_on']} the run trained on")
        if counts["unlabelled"]:
            notes.append(f"{counts['unlabelled']} without an answer, OOD scores only")
        if counts["too_long"]:
            notes.append(f"{counts['too_long']} longer than {block['prompt_len']} tokens, left out")
        parts.append(f"{name} {counts['items']}" + (f" ({'; '.join(notes)})" if notes else ""))
    return "multiple-choice items: " + ", ".join(parts)


@register_probe
class ItemsProbe(Probe):
    name = "items"
    order = 5  # first: the counts say what every later number is over

    def measure(self, ctx: "EvalContext") -> dict[str, Any]:
        return {"prompt_len": prompt_len(ctx.app), ITEM_SETS_KEY: {name: dict(c) for name, c in ctx.counts.items()}}

    def headline(self, block: dict[str, Any]) -> dict[str, Any]:
        return {f"items/{name}": counts for name, counts in block[ITEM_SETS_KEY].items()}

    def show(self, block: dict[str, Any], result: dict[str, Any]) -> None:
        log_line(counts_line(block))
