"""MkDocs hook: render the Sphinx roles in our docstrings (``:func:`add_lora```) as code.

The docstrings are read in the terminal and by IDEs as well, where Sphinx roles are the usual
way to name another object; mkdocstrings leaves them as text (``:func:<code>add_lora</code>``).
``~a.b.c`` keeps the last part, as Sphinx does.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):<code>(~?)([^<]*)</code>")


def _code(match: re.Match[str]) -> str:
    name = match[2].rsplit(".", 1)[-1] if match[1] else match[2]
    return f"<code>{name}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(_code, html)
