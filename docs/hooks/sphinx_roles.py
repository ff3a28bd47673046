"""MkDocs hook: detkit's docstrings use Sphinx roles (:class:`Predictor`, :func:`~detkit.x.f`).

mkdocstrings' Google-style parser leaves them as text; this drops the role and keeps the code span,
showing only the last component where Sphinx would (a leading ``~``).
"""

import re

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj):(?=<code>)")
_TILDE = re.compile(r"<code>~(?:[\w]+\.)*([\w]+)</code>")


def on_page_content(html, page, config, files):
    return _TILDE.sub(r"<code>\1</code>", _ROLE.sub("", html))
