"""Progress bars: live on a terminal, one redraw per LOG_INTERVAL_S seconds in a log file."""
import io
import sys

from speechssl.utils.progress import LOG_INTERVAL_S, progress_bar


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_log_file_updates_every_30_seconds(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert LOG_INTERVAL_S == 30.0
    bar = progress_bar(range(2000), desc="steps")
    assert bar.mininterval == 30.0 and bar.maxinterval >= 30.0 and not bar.dynamic_ncols
    assert sum(1 for _ in bar) == 2000
    bar.close()
    # the first and the final frame only (a bar redrawn per step writes ~2000 carriage-return frames)
    frames = [f for f in log.getvalue().replace("\n", "\r").split("\r") if f.strip()]
    assert len(frames) <= 3, frames
    assert "2000/2000" in frames[-1]


def test_caller_interval_and_terminal_defaults(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar(total=5, mininterval=60.0) as bar:
        assert bar.mininterval == 60.0 and bar.maxinterval >= 60.0
    monkeypatch.setattr(sys, "stderr", _Tty())
    with progress_bar(total=5) as bar:
        assert bar.mininterval < 1.0 and bar.dynamic_ncols
    with progress_bar(total=5, disable=True) as bar:
        assert bar.disable
