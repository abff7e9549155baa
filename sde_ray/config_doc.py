"""Renders docs/config.md, the reference of every config key, from the typed tree.

Run `python -m sde_ray.config_doc > docs/config.md` after changing a field; a test keeps the file
in sync with the code.
"""

from __future__ import annotations

from sde_ray.config import describe


def render() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from `sde_ray/config.py` by `python -m sde_ray.config_doc > docs/config.md`.",
        "Set any key in a YAML file or on the command line as `section.key=value`",
        "(precedence: CLI > file > these defaults).",
        "",
    ]
    section = None
    for key, default, text in describe():
        top = key.split(".")[0]
        if top != section:
            section = top
            lines += ["", f"## `{top}`", "", "| key | default | meaning |", "|---|---|---|"]
        text = text.replace("|", "\\|")
        default = default.replace("|", "\\|")
        lines.append(f"| `{key}` | `{default}` | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
