"""The top-level knobs a chosen router reads, and what a command line sets that changes nothing.

``K``, ``S``, ``T`` and ``beta`` are interpolated into the router section (``conf/config.yaml``
and the router YAMLs); a router reads only some of them (``RouterConfig.knobs_read``): Top-K
reads neither T nor beta, and S only matters where evaluation draws routes. A knob given for a
router that does not read it is said in one line (``vrmoe train`` records it in summary.json;
``train.strict_knobs=true`` refuses the run), and a sweep whose jobs differ only in such knobs
is told which of its jobs are the same run before it starts.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Iterable

from .config import ConfigError, RouterConfig
from .model.routers import ROUTERS, router_class

if TYPE_CHECKING:  # pragma: no cover
    from .config import AppConfig

KNOBS = ("K", "S", "T", "beta")
# Where the config's own router default comes from when a command line names none.
DEFAULT_ROUTER = RouterConfig.name


def _knob_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """knob -> the value text of each top-level knob a command line sets (``T=0.7``)."""
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key in KNOBS:
            out[key] = value
    return out


def readers(knob: str) -> list[str]:
    """The registered routers that read ``knob`` with their default settings."""
    return [name for name, cls in ROUTERS.items() if knob in cls.Config().knobs_read()]


def ignored_knobs(router: RouterConfig, overrides: Iterable[str]) -> list[str]:
    """The knobs the command line sets that ``router`` does not read, as ``T=0.7``."""
    read = router.knobs_read()
    return [f"{knob}={value}" for knob, value in _knob_overrides(overrides).items() if knob not in read]


def ignored_message(router: RouterConfig, ignored: list[str], mention_strict: bool = True) -> str:
    """One line: which knobs change nothing for this router, who reads them, and the fix (and,
    where it applies, that train.strict_knobs=true refuses such runs)."""
    knobs = [text.split("=", 1)[0] for text in ignored]
    who = "; ".join(f"{knob} is read by router={','.join(readers(knob)) or 'none'}" for knob in knobs)
    verb, them = ("changes", "it") if len(ignored) == 1 else ("change", "them")
    return (f"{', '.join(ignored)} {verb} nothing: router={router.name} does not read {', '.join(knobs)} ({who}); "
            f"drop {them}, or choose such a router" + (" (train.strict_knobs=true refuses such runs)" if mention_strict else ""))


def check_knobs(router: RouterConfig, overrides: Iterable[str], strict: bool) -> list[str]:
    """The knobs that change nothing for ``router``; with ``strict`` a ConfigError naming them."""
    ignored = ignored_knobs(router, overrides)
    if ignored and strict:
        raise ConfigError(ignored_message(router, ignored, mention_strict=False))
    return ignored


# Settings another setting decides whether a run reads: key -> (does this run read it, the line's reason).
CONDITIONAL_SETTINGS = {
    "data.vocab_size": (lambda app: app.data.tokenizer == "bpe",
                        lambda app: f"only data.tokenizer=bpe reads it, and this run's tokenizer is "
                                    f"{app.data.tokenizer}; drop it, or add data.tokenizer=bpe"),
}


def unread_settings(app: "AppConfig", overrides: Iterable[str]) -> list[str]:
    """One line for each setting the command line gives that this run does not read (beyond the
    router's knobs): ``data.vocab_size=8192 changes nothing: ...``."""
    lines = []
    for item in overrides:
        key, sep, value = item.lstrip("+").partition("=")
        if sep and key in CONDITIONAL_SETTINGS and not CONDITIONAL_SETTINGS[key][0](app):
            lines.append(f"{key}={value} changes nothing: {CONDITIONAL_SETTINGS[key][1](app)}")
    return lines


def duplicate_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs of a sweep (Hydra's basic sweeper: every combination of the swept values) that are
    the same run because they differ only in knobs their router does not read: groups of two or
    more jobs, each job as its overrides joined by spaces. A sweep this cannot expand (a sweeper's
    own syntax: ranges, intervals) gives none."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
                else [o.input_line] for o in parsed]
    except Exception:
        return []
    groups: dict[tuple, list[str]] = {}
    for job in itertools.product(*axes):
        values = dict(item.split("=", 1) for item in job if "=" in item)
        try:
            router = router_class(values.get("router", DEFAULT_ROUTER)).Config()
        except ConfigError:
            return []
        if "router.eval_mode" in values and hasattr(router, "eval_mode"):
            router.eval_mode = values["router.eval_mode"]
        read = router.knobs_read()
        key = tuple(item for item in job if item.split("=", 1)[0] not in KNOBS or item.split("=", 1)[0] in read)
        groups.setdefault(key, []).append(" ".join(job))
    return [jobs for jobs in groups.values() if len(jobs) > 1]
