"""Small plots for the dashboard, drawn on the server as inline SVG (no JavaScript, no library).

Every text that goes into the SVG is escaped; colours are presentation attributes so that the
page's Content-Security-Policy (no inline styles) holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from markupsafe import Markup

WIDTH = 360
HEIGHT = 120
PAD_LEFT = 34
PAD_BOTTOM = 18
PAD_TOP = 8


def _x(i: int, n: int) -> float:
    inner = WIDTH - PAD_LEFT - 6
    return PAD_LEFT + (i + 0.5) * inner / max(n, 1)


def _y(value: float, top: float) -> float:
    inner = HEIGHT - PAD_BOTTOM - PAD_TOP
    return HEIGHT - PAD_BOTTOM - (value / top if top else 0.0) * inner


def _frame(labels: Sequence[str], top: float, top_label: str, title: str) -> list[str]:
    n = len(labels)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<line x1="{PAD_LEFT}" y1="{_y(0, top):.1f}" x2="{WIDTH - 4}" y2="{_y(0, top):.1f}" '
        'stroke="#888" stroke-width="1"/>',
        f'<line x1="{PAD_LEFT}" y1="{_y(top, top):.1f}" x2="{WIDTH - 4}" y2="{_y(top, top):.1f}" '
        'stroke="#ddd" stroke-width="1"/>',
        f'<text x="{PAD_LEFT - 4}" y="{_y(top, top) + 4:.1f}" text-anchor="end" '
        f'font-size="10" fill="#555">{escape(top_label)}</text>',
        f'<text x="{PAD_LEFT - 4}" y="{_y(0, top) + 4:.1f}" text-anchor="end" '
        'font-size="10" fill="#555">0</text>',
    ]
    step = max(1, -(-n // 6))  # at most six labels, the newest week always among them
    for i, label in enumerate(labels):
        if (n - 1 - i) % step == 0:
            parts.append(
                f'<text x="{_x(i, n):.1f}" y="{HEIGHT - 4}" text-anchor="middle" font-size="9" '
                f'fill="#555">{escape(label)}</text>'
            )
    return parts


def bars(
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[int], str]],
    title: str,
) -> Markup:
    """Grouped bars: ``series`` is (name, values, colour) per group member."""
    top = max([1, *(v for _, values, _ in series for v in values)])
    parts = _frame(labels, top, str(top), title)
    n = len(labels)
    slot = (WIDTH - PAD_LEFT - 6) / max(n, 1)
    width = max(1.0, slot * 0.8 / max(len(series), 1))
    for k, (name, values, colour) in enumerate(series):
        for i, value in enumerate(values):
            x = _x(i, n) - slot * 0.4 + k * width
            y = _y(value, top)
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" '
                f'height="{_y(0, top) - y:.1f}" fill="{colour}">'
                f"<title>{escape(f'{labels[i]}: {value} {name}')}</title></rect>"
            )
    parts.append("</svg>")
    return Markup("".join(parts))


def line(labels: Sequence[str], values: Sequence[float | None], title: str, unit: str) -> Markup:
    """A line with dots; gaps where a value is missing. ``unit`` labels the top of the axis."""
    present = [v for v in values if v is not None]
    top = 1.0 if unit == "%" else max([*present, 1.0])  # at least 1 unit tall
    parts = _frame(labels, top, f"{top * 100:.0f}%" if unit == "%" else f"{top:.3g} {unit}", title)
    n = len(labels)
    run: list[str] = []
    for i, value in enumerate([*values, None]):
        if value is None:
            if len(run) > 1:
                parts.append(
                    f'<polyline points="{" ".join(run)}" fill="none" stroke="#1f5fa8" '
                    'stroke-width="1.5"/>'
                )
            run = []
            continue
        x, y = _x(i, n), _y(value, top)
        run.append(f"{x:.1f},{y:.1f}")
        shown = f"{value * 100:.0f}%" if unit == "%" else f"{value:.3g} {unit}"
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#1f5fa8">'
            f"<title>{escape(f'{labels[i]}: {shown}')}</title></circle>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))
