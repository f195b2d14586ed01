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


def role_variables(argument_specs: Path) -> str:
    """The Ansible role's public variables, as a Markdown table, from meta/argument_specs.yml."""
    import yaml

    options = yaml.safe_load(argument_specs.read_text())["argument_specs"]["main"]["options"]
    rows = ["| variable | type | default | what it sets |", "|---|---|---|---|"]
    for name, spec in options.items():
        desc = spec.get("description", "")
        desc = " ".join(desc) if isinstance(desc, list) else desc
        if spec.get("options"):
            subs = ", ".join(f"`{k}`" for k in spec["options"])
            desc += f" Keys: {subs}."
        default = spec.get("default", "(required)" if spec.get("required") else "")
        if isinstance(default, bool):
            default = str(default).lower()
        default_s = '`""`' if default == "" else f"`{default if not isinstance(default, (dict, list)) else _inline(default)}`"
        if spec.get("no_log"):
            desc += " Secret (no_log)."
        rows.append(f"| `{name}` | {spec['type']} | {default_s} | {_plain(desc)} |")
    return "\n".join(rows) + "\n"


def _inline(value) -> str:
    import json

    return json.dumps(value).replace('"', "")


def _plain(text: str) -> str:
    """Ansible doc markup (C(x), O(x)) as Markdown code; pipes escaped for tables."""
    import re

    return re.sub(r"\b[CO]\(([^)]*)\)", r"`\1`", text).replace("|", "\\|")


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m ingest.docs README.md   (regenerates the role-variables section)")
    root = Path(__file__).resolve().parent.parent
    replace_section(Path(sys.argv[1]), "role-vars", role_variables(root / "ansible/roles/sonde/meta/argument_specs.yml"))
