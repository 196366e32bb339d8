"""``vrmoe train --help``: a reference of the composed configuration, every key with its value and
what it sets, read from the comments on the dataclass fields (``vrmoe/config.py`` and each
router's ``Config``): the one place each key is described.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
from typing import Any

from .config import AppConfig, dotted_keys, to_dict

_FIELD = re.compile(r"^(\w+)\s*:\s*[^=#]+?(?:=[^#]*)?(?:#\s*(?P<inline>.*))?$")


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment (the ``#`` lines right above it, or one after it on its line),
    for ``cls`` and the dataclasses it extends (a subclass's comment wins)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()[1:]
        except (OSError, TypeError):  # a class defined where its source cannot be read
            continue
        pending: list[str] = []
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#"):
                pending.append(stripped.lstrip("#").strip())
                continue
            match = _FIELD.match(stripped)
            if match and not stripped.startswith(("def ", "return ", "@")):
                text = " ".join(pending) or (match.group("inline") or "")
                if text:
                    out[match.group(1)] = text
            pending = []
    return out


def _section_classes(app: AppConfig) -> dict[str, type]:
    """Section prefix -> the dataclass its keys are declared in ("" for the top-level knobs)."""
    sections = {"": AppConfig}
    for f in dataclasses.fields(app):
        value = getattr(app, f.name)
        if dataclasses.is_dataclass(value):
            sections[f.name] = type(value)
    return sections


def reference(app: AppConfig, width: int = 100) -> str:
    """Every key of ``app`` as ``key = value`` with its description, section by section."""
    comments = {prefix: field_comments(cls) for prefix, cls in _section_classes(app).items()}
    lines: list[str] = []
    last_section = None
    for key, value in dotted_keys(to_dict(app)).items():
        section, _, name = key.rpartition(".")
        if section != last_section:
            lines.append("" if lines else "")
            lines.append(f"{section or 'top-level knobs'}:")
            last_section = section
        text = comments.get(section, {}).get(name, "")
        head = f"  {key} = {_show(value)}"
        if not text:
            lines.append(head)
            continue
        body = textwrap.wrap(text, width=max(40, width - 8))
        lines.append(head)
        lines.extend(f"      {part}" for part in body)
    return "\n".join(lines).lstrip("\n")


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
