"""The default --threads of attnkit generate/chat: the cores that the load average leaves idle."""

from __future__ import annotations

import os

import pytest

from attnkit.cli import generate


@pytest.mark.parametrize("load,expected", [(0.0, 2), (0.6, 2), (1.0, 1), (1.7, 1), (18.5, 1)])
def test_busy_cores_are_left_out_and_one_thread_remains(monkeypatch, load, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert generate.default_threads() == expected


def test_without_a_load_average_every_core_is_used(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)

    def unavailable():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert generate.default_threads() == 4
