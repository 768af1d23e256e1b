"""The progress line: drawn on a terminal only, never above 100%, and 100% once the work is done."""

import io

from mimo_ckpt.io.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _last_line(out):
    return out.getvalue().rstrip("\n").split("\r")[-1]


def test_the_last_line_reads_100_percent_when_advances_left_headers_out():
    out = Terminal()
    bar = Progress("reshard", 1000, stream=out, interval=0)
    bar.advance(980)  # the bytes of the items; the files' headers were never advanced
    assert "(98%)" in _last_line(out)
    bar.close()
    assert "1000 B/1000 B (100%)" in _last_line(out)


def test_never_above_100_percent():
    out = Terminal()
    bar = Progress("compose", 1000, stream=out, interval=0)
    bar.advance(1200)  # files counted with their headers
    assert "(100%)" in _last_line(out)


def test_silent_when_piped():
    out = io.StringIO()
    bar = Progress("export", 10, stream=out, interval=0)
    bar.advance(10)
    bar.close()
    assert out.getvalue() == ""
