"""`prism top` against the live server: one frame for scripts, and the live redraw."""

from __future__ import annotations

import io

import pytest
from server_helpers import API_KEY, MODEL, MODEL_B, LiveServer

from prism.cli import main
from prism.server.admin_client import AdminClient
from prism.server.top import CLEAR, SHOW_CURSOR, run_top


def test_once_prints_devices_models_states_and_memory(
    server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["top", "--once", "--url", server.base_url, "--api-key", API_KEY]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # no escapes for scripts
    lines = out.splitlines()
    assert lines[0].startswith(f"prism top  {server.base_url}")
    assert any(line.startswith("cpu (prism)  [") and "GiB used" in line for line in lines)
    header = next(line for line in lines if line.startswith("MODEL"))
    for column in ("STATE", "WEIGHTS", "KV", "RUNNING", "WAITING"):
        assert column in header
    rows = {line.split()[0]: line.split() for line in lines[lines.index(header) + 1 :]}
    assert set(rows) == {MODEL, MODEL_B}
    for row in rows.values():
        assert row[1:3] == ["active", "cpu"]
        assert row[4] == "MiB"  # weights mapped, in MiB


def test_live_view_redraws_each_interval(server: LiveServer) -> None:
    out = io.StringIO()
    sleeps: list[float] = []
    run_top(AdminClient(server.base_url, API_KEY), 0.5, out, max_frames=3, sleep=sleeps.append)
    text = out.getvalue()
    assert text.count(CLEAR) == 3 and sleeps == [0.5, 0.5]
    assert text.endswith(SHOW_CURSOR)
    assert all(MODEL_B in frame for frame in text.split(CLEAR)[1:])


def test_a_refused_or_unreachable_server(
    server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["top", "--once", "--url", server.base_url]) == 1  # no API key
    assert "401" in capsys.readouterr().err
    out = io.StringIO()
    run_top(AdminClient("http://127.0.0.1:9"), 1.0, out, max_frames=1)
    assert "cannot reach http://127.0.0.1:9" in out.getvalue()
