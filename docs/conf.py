"""Sphinx configuration: the user guide (Markdown, via MyST) and the API reference (autodoc from the
docstrings). Builds offline: ``python -m sphinx -W -b html docs docs/_build/html``."""

from __future__ import annotations

import kama

project = "kama-nn"
author = "The kama-nn developers"
release = kama.__version__
version = kama.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax",
              "sphinx.ext.viewcode"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

autodoc_member_order = "bysource"
autodoc_inherit_docstrings = False
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [("Shape", "params_style")]
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = f"kama-nn {release}"
nitpicky = False
