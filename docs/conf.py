"""Sphinx configuration of beamhub's documentation site (MyST Markdown, like JupyterHub's).

Build it with ``./dev docs`` (warnings are errors); tests/test_docs.py builds it in CI. The
reference pages are generated from the code when the site is built (docs/_ext/beamhub_docs.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "beamhub"
author = "the beamhub developers"
copyright = "the beamhub developers, BSD-3-Clause"
extensions = ["myst_parser", "beamhub_docs"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # [text](page.md#a-heading) links are checked at build time

html_theme = "pydata_sphinx_theme"
html_title = "beamhub"
html_theme_options = {
    "navigation_with_keys": False,
    "header_links_before_dropdown": 6,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_show_sourcelink = False
html_static_path: list[str] = []
