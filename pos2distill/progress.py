"""Progress bars: tqdm on a terminal, plain lines in a log.

A bar redrawn with carriage returns turns a redirected log into one endless line. When
stderr (where bars go) is not a terminal, our bars print whole lines instead, at most one
per ``LOG_INTERVAL`` seconds plus the last, and the libraries' bars (weights loading, shard
writing, dataset saving) are switched off.
"""

import os
import sys

LOG_INTERVAL = 30.0  # seconds between two lines of one bar in a log


def _in_log() -> bool:
    return not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


class _LineWriter:
    """tqdm's file in a log: each redraw becomes a line, unless only its times changed."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        count = line.rsplit(" [", 1)[0]  # "desc: n/total (p%), postfix" without the times
        if line and count != self.last:
            self.stream.write(line + "\n")
            self.last = count

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(**kwargs):
    """``tqdm(**kwargs)`` on a terminal; in a log, the same bar written as lines."""
    from tqdm.auto import tqdm

    if _in_log() and not kwargs.get("disable"):
        kwargs.update(file=_LineWriter(sys.stderr), mininterval=LOG_INTERVAL, delay=LOG_INTERVAL, dynamic_ncols=False,
                      bar_format="{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%){postfix} [{elapsed}<{remaining}, {rate_fmt}]")
    return tqdm(**kwargs)


def quiet_library_bars() -> None:
    """In a log, switch off the progress bars of transformers and datasets (a user's setting wins).

    Read by those libraries when they are imported, so this runs before them (the CLIs' start);
    a library already imported is told directly.
    """
    if not _in_log():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow huggingface_hub's
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
