"""Generated sections of the README: text between `<!-- NAME:start -->` and `<!-- NAME:end -->`."""
from __future__ import annotations

from pathlib import Path


def section(text: str, name: str) -> str:
    return text.split(f"<!-- {name}:start -->\n", 1)[1].split(f"<!-- {name}:end -->", 1)[0]


def replace_section(path: Path, name: str, content: str) -> None:
    text = path.read_text()
    head, sep, rest = text.partition(f"<!-- {name}:start -->\n")
    _, sep2, tail = rest.partition(f"<!-- {name}:end -->")
    if not sep or not sep2:
        raise ValueError(f"{path} has no <!-- {name}:start --> / <!-- {name}:end --> markers")
    path.write_text(head + sep + content + sep2 + tail)
