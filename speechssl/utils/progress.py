"""Progress bars that suit both a terminal and a log file."""
from __future__ import annotations

import sys

LOG_INTERVAL_S = 30.0
"""Seconds between bar updates when stderr is not a terminal (a ``tee``'d recipe log)."""


def progress_bar(iterable=None, *, disable: bool = False, **kwargs):
    """A tqdm bar: live on a terminal; on a file or pipe it redraws at most every ``LOG_INTERVAL_S`` seconds, so
    a log holds a line per half minute instead of a carriage-return frame per step. Keyword arguments go to tqdm."""
    from tqdm.auto import tqdm

    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", max(LOG_INTERVAL_S, kwargs["mininterval"]))
        kwargs.setdefault("dynamic_ncols", False)
    else:
        kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=disable, **kwargs)
