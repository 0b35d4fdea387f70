"""Alert message templates: checked when the config loads, so a bad one never reaches a firing."""

from __future__ import annotations

import string
from collections.abc import Mapping

#: fields every message template may use, with the values a template is test-rendered with
COMMON_FIELDS: Mapping[str, object] = {
    "name": "rule",
    "metric": "loss",
    "value": 1.0,
    "threshold": 1.0,
    "step": 0,
    "run": "run",
    "rank": 0,
    "severity": "warning",
}


def check_template(template: str, fields: Mapping[str, object]) -> None:
    """Raise ValueError unless ``template`` renders with ``fields`` (and with step None)."""
    known = ", ".join("{" + name + "}" for name in sorted(fields))
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"message template {template!r}: {exc}") from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError(
                f"message template {template!r}: positional field {{{name}}}; use names: {known}"
            )
        if "." in name or "[" in name:
            raise ValueError(
                f"message template {template!r}: {{{name}}}: attribute and index lookups are "
                f"not allowed; fields: {known}"
            )
        if name not in fields:
            raise ValueError(f"message template {template!r}: unknown field {{{name}}}; {known}")
    for step in (0, None):
        try:
            template.format_map({**fields, "step": step})
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            hint = " (step is None for records without a step: format it as {step})"
            raise ValueError(
                f"message template {template!r} does not render: {exc}"
                + (hint if step is None else "")
            ) from None
