"""A job's output as the jobs API serves it: the last bytes only, never through a link the job
planted, and never starting inside a UTF-8 character."""

from __future__ import annotations

import os

import pytest

from beamhub.kernels.scheduler import SchedulerError, read_tail


def test_the_tail_of_a_large_output_starts_on_a_character(tmp_path):
    path = tmp_path / "j.out"
    path.write_bytes("é".encode() * 50 + b"end\n")  # 2-byte characters
    out = read_tail("j", path, max_bytes=9)  # odd cut: the first byte is a continuation byte
    assert out.size == 104 and out.truncated is True
    assert out.text == "ééend\n"
    whole = read_tail("j", path)
    assert whole.truncated is False and whole.text == "é" * 50 + "end\n"


def test_no_output_yet_is_empty(tmp_path):
    out = read_tail("j", tmp_path / "missing.out")
    assert (out.text, out.size, out.truncated) == ("", 0, False)


def test_links_and_special_files_are_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("not yours")
    (tmp_path / "link.out").symlink_to(secret)
    with pytest.raises(SchedulerError, match="cannot be read") as info:
        read_tail("j", tmp_path / "link.out")
    assert info.value.status == 409
    os.mkfifo(tmp_path / "fifo.out")
    with pytest.raises(SchedulerError, match="not a regular file"):
        read_tail("j", tmp_path / "fifo.out")
