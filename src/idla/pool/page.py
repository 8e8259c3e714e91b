"""The pool's status page: devices, jobs with their priorities and states, and the allocation
over time as an inline SVG (one row per device, one colour per job). No script, no external
asset: one HTML string, every user-given text escaped. Cost: O(history + jobs + devices).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from idla.pool.model import Device

_COLOURS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
            "#ff9da7", "#9c755f", "#bab0ac")
_ROW_PX, _LEFT_PX, _WIDTH_PX = 26, 70, 720


def colour(job_id: str, order: Sequence[str]) -> str:
    return _COLOURS[order.index(job_id) % len(_COLOURS)] if job_id in order else "#999"


def allocation_svg(history: Sequence[tuple[float, str, tuple[str, ...]]],
                   devices: Sequence[Device], order: Sequence[str], now_s: float) -> str:
    """Devices × time: a bar for each stretch a job held a device, from ``history`` (time, job,
    its devices from then on)."""
    rows = {d.device_id: i for i, d in enumerate(devices)}
    start_s = min((t for t, _, _ in history), default=now_s)
    span_s = max(now_s - start_s, 1.0)
    height = _ROW_PX * len(devices) + 30

    def x(t: float) -> float:
        return _LEFT_PX + (_WIDTH_PX - _LEFT_PX - 10) * (t - start_s) / span_s

    held: dict[str, tuple[float, tuple[str, ...]]] = {}
    bars: list[tuple[str, str, float, float]] = []
    for t, job, job_devices in [*history, (now_s, "", ())]:
        for other, (since, had) in list(held.items()):
            if other == job or not job:
                bars.extend((other, d, since, t) for d in had)
                del held[other]
        if job and job_devices:
            held[job] = (t, job_devices)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH_PX}" height="{height}" '
             'role="img" aria-label="allocation over time">']
    for device_id, row in rows.items():
        y = row * _ROW_PX + 4
        parts.append(f'<text x="4" y="{y + 16}" font-size="12">{html.escape(device_id)}</text>')
        parts.append(f'<line x1="{_LEFT_PX}" y1="{y + 22}" x2="{_WIDTH_PX - 10}" y2="{y + 22}" '
                     'stroke="#ddd"/>')
    for job, device_id, since, until in bars:
        if device_id not in rows:
            continue
        y = rows[device_id] * _ROW_PX + 4
        parts.append(f'<rect x="{x(since):.1f}" y="{y}" width="{max(x(until) - x(since), 1):.1f}"'
                     f' height="20" fill="{colour(job, order)}"><title>{html.escape(job)}'
                     '</title></rect>')
    axis_y = len(devices) * _ROW_PX + 20
    parts.append(f'<text x="{_LEFT_PX}" y="{axis_y}" font-size="11">0 s</text>')
    parts.append(f'<text x="{_WIDTH_PX - 60}" y="{axis_y}" font-size="11">{span_s:.0f} s</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_page(devices: Sequence[Device], jobs: Sequence[Mapping[str, Any]],
                history: Sequence[tuple[float, str, tuple[str, ...]]], now_s: float) -> str:
    """The whole page; ``jobs`` are the API's job rows (id, name, kind, priority, state,
    devices)."""
    order = [str(job["id"]) for job in jobs]
    held = {d: str(job["id"]) for job in jobs for d in job.get("devices", [])}
    device_rows = "".join(
        f"<tr><td>{html.escape(d.device_id)}</td><td>{html.escape(d.kind)}</td>"
        f"<td>{d.memory_bytes / 2**30:.1f} GiB</td><td>{html.escape(held.get(d.device_id, '-'))}"
        "</td></tr>" for d in devices)
    job_rows = "".join(
        f'<tr><td><span class="dot" style="background:{colour(str(job["id"]), order)}"></span>'
        f'{html.escape(str(job["id"]))}</td><td>{html.escape(str(job["name"]))}</td>'
        f'<td>{html.escape(str(job["kind"]))}</td><td>{float(job["priority"]):g}</td>'
        f'<td class="{html.escape(str(job["state"]))}">{html.escape(str(job["state"]))}</td>'
        f'<td>{html.escape(", ".join(job.get("devices", [])) or "-")}</td></tr>' for job in jobs)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>idla pool</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 20px; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 4px 12px; text-align: left; }}
.dot {{ display: inline-block; width: 10px; height: 10px; margin-right: 6px; }}
.running {{ color: #2a7; }} .failed {{ color: #c33; }} .queued {{ color: #888; }}
</style></head><body>
<h1>idla pool</h1>
<h2>Devices</h2>
<table><tr><th>device</th><th>kind</th><th>memory</th><th>job</th></tr>{device_rows}</table>
<h2>Jobs</h2>
<table><tr><th>job</th><th>name</th><th>kind</th><th>priority</th><th>state</th>
<th>devices</th></tr>{job_rows}</table>
<h2>Allocation over time</h2>
{allocation_svg(history, devices, order, now_s)}
</body></html>
"""
