"""Problems found in a dataset: :class:`Problem` (one file, maybe one line, what is wrong and what was done),
:class:`DatasetError` (the dataset cannot be used) and :func:`format_problems`, the table printed for them.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

# Problem severities: SKIPPED = the row, line or instance is not used; WARNING = used, as corrected.
SKIPPED, WARNING = "skipped", "warning"


class DatasetError(Exception):
    """The dataset cannot be used (no CSV, nothing usable left...); one-line message.

    ``problems`` holds the per-file problems found on the way, for :func:`format_problems`."""

    def __init__(self, message: str, problems: Sequence["Problem"] = ()):
        super().__init__(message)
        self.problems = list(problems)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with the data: the file (relative to the dataset root), the line in
    that file when it applies, and what is wrong (including what was done about it).

    ``severity``: SKIPPED (the row, line or instance is not used) or WARNING (used as corrected).
    ``kind`` groups problems of one sort: for the per-file cap, and for :func:`format_problems`' summary."""

    file: str
    line: int | None
    message: str
    severity: str = SKIPPED
    kind: str = dataclasses.field(default="", compare=False)


def format_problems(problems: Sequence[Problem], per_kind: int | None = None) -> str:
    """One table of problems (file, line, severity, problem); 'no problems found' when empty.

    Severity ``skipped``: the row, line or instance is not used; ``warning``: used as corrected. ``per_kind``: list
    only the first that many problems of each kind, the rest of each kind counted in one line (100,000 rows naming
    missing videos make a 100,000-line table otherwise); the first line still counts them all."""
    if not problems:
        return "no problems found in the dataset"
    shown = list(problems) if per_kind is None else _first_of_each_kind(problems, per_kind)
    rows = [(p.file, "-" if p.line is None else str(p.line), p.severity, p.message) for p in shown]
    warnings = sum(p.severity == WARNING for p in problems)
    wf = max(4, *(len(r[0]) for r in rows))
    wl = max(4, *(len(r[1]) for r in rows))
    ws = max(8, *(len(r[2]) for r in rows))
    cut = f"; the first {per_kind} of each kind" if len(shown) < len(problems) else ""
    lines = [f"{len(problems)} problem(s) in the dataset ({len(problems) - warnings} skipped, {warnings} warning(s): "
             f"used as corrected){cut}:",
             f"{'file':<{wf}}  {'line':>{wl}}  {'severity':<{ws}}  problem",
             f"{'-' * wf}  {'-' * wl}  {'-' * ws}  {'-' * 7}"]
    lines += [f"{f:<{wf}}  {ln:>{wl}}  {sv:<{ws}}  {m}" for f, ln, sv, m in rows]
    return "\n".join(lines)


def _first_of_each_kind(problems: Sequence[Problem], limit: int) -> list[Problem]:
    """The first ``limit`` problems of each (kind, severity), kinds in order of first appearance, each followed by
    one problem counting the rest of its kind."""
    groups: dict[tuple[str, str], list[Problem]] = {}
    for problem in problems:
        groups.setdefault((problem.kind, problem.severity), []).append(problem)
    out = []
    for (kind, severity), group in groups.items():
        out += group[:limit]
        if len(group) > limit:
            out.append(Problem("...", None, f"{len(group) - limit} more like the above ({kind or 'other'})", severity,
                               kind))
    return out
