"""Progress bars as lines in a log, the libraries' bars off there, and a terminal left alone."""

import io
import os

import pytest

from pos2distill import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _run_bar(steps=4, postfix=False):
    bar = progress.progress_bar(total=steps, desc="position 0", unit="prompt")
    for step in range(steps):
        if postfix:
            bar.set_postfix(loss=1.0 / (step + 1))
        bar.update(1)
    bar.close()


def test_in_a_log_a_bar_is_whole_lines(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
    _run_bar(postfix=True)
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[-1].startswith("position 0: 4/4 (100%), loss=0.25 [")
    assert len(lines) == len(set(line.rsplit(" [", 1)[0] for line in lines))  # no line repeats only new times


def test_in_a_log_a_short_bar_says_nothing(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    _run_bar()  # ends well within LOG_INTERVAL: the caller's own summary line is enough
    assert log.getvalue() == ""


def test_on_a_terminal_the_bar_is_tqdm_redrawn_in_place(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    _run_bar()
    assert "\r" in terminal.getvalue()


def test_library_bars_off_in_a_log_only_and_a_users_choice_wins(monkeypatch):
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("sys.stderr", _Terminal())
    progress.quiet_library_bars()
    assert "HF_DATASETS_DISABLE_PROGRESS_BARS" not in os.environ
    monkeypatch.setattr("sys.stderr", io.StringIO())
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    progress.quiet_library_bars()
    assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"


def test_training_silences_only_the_unactionable_warnings():
    import logging
    import warnings

    pytest.importorskip("deepspeed")
    from deepspeed.utils import logger

    from kd.strategy import _quiet_unactionable_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_unactionable_warnings()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("`something_else` is deprecated", FutureWarning)
        warnings.warn("'set_vital' is deprecated, please do not call", UserWarning)  # not from torchdata
    assert [str(w.message) for w in caught] == ["`something_else` is deprecated",
                                                "'set_vital' is deprecated, please do not call"]
    kept = []

    class Keep(logging.Handler):
        def emit(self, record):
            kept.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("**** You are using ZeRO with an untested optimizer, proceed with caution *****")
        logger.warning("another DeepSpeed warning")
    finally:
        logger.removeHandler(handler)
    assert kept == ["another DeepSpeed warning"]
