"""`prism top`: a live view of a server's devices, models, states and memory, read from
its admin API once a second and redrawn with plain ANSI escapes (`--once`: one frame,
no escapes, for scripts)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from prism.server.admin_client import AdminClient, AdminError

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
BAR_WIDTH = 40
_STATE_COLOURS = {"active": "32", "asleep": "34", "cached": "33", "stopped": "31"}

Row = Mapping[str, Any]


def add_top_parser(sub: Any, environ: Mapping[str, str]) -> None:
    url_default = "http://127.0.0.1:8000"
    top = sub.add_parser("top", help="live view of a server's devices, models and memory")
    top.add_argument("--url", default=url_default, help=f"the server (default: {url_default})")
    top.add_argument(
        "--api-key", default=environ.get("PRISM_API_KEY") or None, help="default: $PRISM_API_KEY"
    )
    top.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.set_defaults(func=_top)


def _top(args: argparse.Namespace) -> int:
    client = AdminClient(args.url, args.api_key, timeout_s=10.0)
    if args.once:
        return print_once(client, sys.stdout)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how one leaves
        run_top(client, args.interval, sys.stdout)
    return 0


def print_once(client: AdminClient, out: TextIO) -> int:
    try:
        out.write(frame(client, colour=False) + "\n")
    except AdminError as e:
        print(f"prism top: {e}", file=sys.stderr)
        return 1
    return 0


def run_top(
    client: AdminClient,
    interval_s: float,
    out: TextIO,
    max_frames: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Redraw every `interval_s` until interrupted (or `max_frames` drawn); a server that
    cannot be reached shows as such until it can."""
    colour = out.isatty()
    out.write(HIDE_CURSOR)
    drawn = 0
    try:
        while max_frames is None or drawn < max_frames:
            try:
                text = frame(client, colour, interval_s)
            except AdminError as e:
                text = f"{_title(client.url, interval_s)}\n\n{e}"
            out.write(CLEAR + text + "\n")
            out.flush()
            drawn += 1
            if max_frames is None or drawn < max_frames:
                sleep(interval_s)
    finally:
        out.write(SHOW_CURSOR)
        out.flush()


def frame(client: AdminClient, colour: bool, interval_s: float | None = None) -> str:
    """One screen: a title, a memory bar per device, a table of the models."""
    devices, models = client.memory(), client.models()
    parts = [_title(client.url, interval_s), ""]
    parts += [_device_line(d) for d in devices]
    parts += ["", models_view(models, colour)]
    return "\n".join(parts)


def _title(url: str, interval_s: float | None) -> str:
    """The server and the time; how often the view is redrawn, if it is."""
    title = f"prism top  {url}  {time.strftime('%H:%M:%S')}"
    return title if interval_s is None else f"{title}  (every {interval_s:g}s; Ctrl-C quits)"


def _device_line(device: Row) -> str:
    budget, used = device["budget_bytes"], device["used_bytes"]
    share = used / budget if budget else 0.0
    filled = round(share * BAR_WIDTH)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    return (
        f"{device['device']} ({device['mode']})  [{bar}]  {size(used)} of {size(budget)} "
        f"used ({share:.0%}), {size(device['free_bytes'])} free, "
        f"{len(device['tenants'])} tenants, pages of {size(device['page_size'])}"
    )


_COLUMNS: tuple[tuple[str, Callable[[Row], str]], ...] = (
    ("MODEL", lambda m: str(m["name"])),
    ("STATE", lambda m: str(m["state"])),
    ("DEVICE", lambda m: str(m["device"])),
    ("WEIGHTS", lambda m: size(m["weights_bytes_mapped"])),
    ("KV", lambda m: size(m["kv_bytes_mapped"])),
    ("KV LIMIT", lambda m: size(m["kv_bytes_limit"])),
    ("BLOCKS USED/FREE", lambda m: f"{m['kv_blocks_used']}/{m['kv_blocks_free']}"),
    ("RUNNING", lambda m: str(m["num_running"])),
    ("WAITING", lambda m: str(m["num_waiting"])),
    ("WAKES", lambda m: str(m["wakes"])),
    ("SLEEPS", lambda m: str(m["sleeps"])),
    ("PREEMPT", lambda m: str(m.get("preemptions", "-"))),
    ("LAST WAKE", lambda m: f"{m['last_wake_ms']:.0f} ms" if m["wakes"] else "-"),
)


def models_view(models: Sequence[Row], colour: bool) -> str:
    header = [name for name, _ in _COLUMNS]
    rows = [[cell(m) for _, cell in _COLUMNS] for m in models]
    widths = [max(len(c) for c in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        if colour:  # after padding, so escapes do not upset the widths
            code = _STATE_COLOURS.get(row[1], "0")
            cells[1] = f"\x1b[{code}m{cells[1]}\x1b[0m"
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"
