"""Build progress for a person: steps with elapsed time, a live bar on a terminal, every line in the log."""

from __future__ import annotations

import io

from execbox.images import BuildProgress, step


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_one_line_per_step_and_details_only_in_the_log() -> None:
    out, log = io.StringIO(), io.StringIO()
    p = BuildProgress(out, log)
    p("execbox-rootfs:abc is up to date")
    step(p, "agent layer execbox-sandbox:def")
    p("Step 1/4 : FROM execbox-rootfs:abc")
    p("Step 2/4 : COPY files/ /opt/execbox/")
    step(p, "package image 'data'")
    p("Successfully built 123")
    p.finish()
    lines = out.getvalue().splitlines()
    assert lines[0] == "execbox-rootfs:abc is up to date"
    assert lines[1] == "[1] agent layer execbox-sandbox:def ..."
    assert lines[2].startswith("[1] agent layer execbox-sandbox:def: done in ") and lines[2].endswith(" s")
    assert lines[3] == "[2] package image 'data' ..."
    assert lines[4].startswith("[2] package image 'data': done in ")
    assert len(lines) == 5 and "Step 1/4" not in out.getvalue()
    assert "Step 2/4 : COPY files/ /opt/execbox/" in log.getvalue() and "Successfully built 123" in log.getvalue()


def test_on_a_terminal_a_live_bar_where_the_total_is_known() -> None:
    out = Tty()
    p = BuildProgress(out, tty=True)
    step(p, "agent layer")
    p._drawn = 0.0  # draw every update (it redraws at most every 0.1 s)
    p("Step 3/4 : COPY files/execbox_state.py /usr/lib/python3/dist-packages/")
    p._drawn = 0.0
    p("Step 4/4 : CMD [...]")
    p.finish()
    text = out.getvalue()
    assert "\r[1] agent layer" in text
    assert "[############............] 2/4" in text and "[##################......] 3/4" in text
    assert text.rstrip().endswith(" s") and "[1] agent layer: done in" in text


def test_a_plain_callable_gets_steps_as_lines() -> None:
    lines: list[str] = []
    step(lines.append, "debootstrap bookworm")
    assert lines == ["== debootstrap bookworm =="]
