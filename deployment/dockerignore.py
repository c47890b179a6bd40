""".dockerignore, read the way Docker reads it, so that a release holds every file the
remote `docker compose build` will send and none it would leave out.

Docker's rules (moby/patternmatcher): one pattern a line, `#` starts a comment, a
leading `!` re-includes what an earlier line excluded, the last matching line wins.
Patterns are relative to the context (a leading `/` is dropped) and cleaned like paths.
`*` and `?` do not cross `/`, `**` matches any number of directories, `[...]` is a
class, `\\` escapes. A pattern that matches a directory matches everything under it.
The Dockerfile and .dockerignore are sent whatever the file says.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

ALWAYS_SENT = {"Dockerfile", ".dockerignore"}


@dataclass(frozen=True)
class Rule:
    regex: re.Pattern
    include: bool  # a `!` line


def _translate(pattern: str) -> re.Pattern:
    out = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):
                    out.append("(?:.*/)?")  # `**/`: zero or more directories
                    i += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            start = i + 2 if pattern.startswith(("[!", "[^"), i) else i + 1
            end = pattern.find("]", start)
            if end <= start:  # no closing bracket, or an empty class: a literal `[`
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                negate = body[:1] in ("!", "^")
                # Only ranges (a-z) keep a meaning inside; anything Python's regex
                # classes would read specially is taken literally.
                body = "".join("\\" + ch if ch in "\\[]^&~|" else ch for ch in body[negate:])
                out.append(f"[{'^' if negate else ''}{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def parse(text: str) -> list[Rule]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        if include:
            line = line[1:].strip()
        line = posixpath.normpath(line.lstrip("/")) if line.lstrip("/") else ""
        if line in ("", "."):
            continue
        rules.append(Rule(_translate(line), include))
    return rules


def load(context: Path) -> list[Rule]:
    f = context / ".dockerignore"
    return parse(f.read_text()) if f.is_file() else []


def excluded(rel: str, rules: list[Rule]) -> bool:
    """Whether Docker leaves the context-relative path `rel` out of the build context."""
    if rel in ALWAYS_SENT:
        return False
    parts = rel.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    out = False
    for rule in rules:
        if any(rule.regex.match(p) for p in prefixes):
            out = not rule.include
    return out


def may_hold_included(rules: list[Rule]) -> bool:
    """An excluded directory can be skipped whole only when no `!` line could bring
    something under it back."""
    return any(r.include for r in rules)
