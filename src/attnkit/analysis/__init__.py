"""Tools that explain and measure attention.

:func:`explain_text` runs a model on a text and returns the explain data, a plain dict (its
layout: :mod:`attnkit.analysis.explain_data`) that ``attnkit explain`` shows as terminal tables,
PNG heatmaps and a self-contained HTML page.
"""

from .explain_run import explain_text

__all__ = ["explain_text"]
