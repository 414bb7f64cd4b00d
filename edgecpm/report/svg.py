"""Small inline-SVG plots for the HTML report (no JavaScript, no network): line, histogram, bars, stacked bars.

Each function returns one `<svg>` element as a string with a title, labelled axes with units, and a legend where
there is more than one series. Text is XML-escaped; numbers on axes come from `nice_ticks`.
"""

from __future__ import annotations

import math
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
FONT = "font-family=\"system-ui, -apple-system, 'Segoe UI', sans-serif\""


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (steps of 1, 2, 2.5 or 5 times a power of ten)."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0, 1.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    start = math.floor(low / step) * step
    ticks = [round(start, 12)]
    while ticks[-1] < high - step * 1e-9:  # the last tick covers high
        ticks.append(round(start + len(ticks) * step, 12))
    return ticks


def fmt(value: float) -> str:
    """A short label for an axis or bar value: 1234 -> 1234, 0.0123 -> 0.0123, 1.5e9 -> 1.5e9."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e6 or magnitude < 1e-3:
        return f"{value:.2g}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


class _Canvas:
    def __init__(self, width: int, height: int, title: str, left: int = 64, right: int = 16, top: int = 34, bottom: int = 48):
        self.width, self.height, self.title = width, height, title
        self.left, self.right, self.top, self.bottom = left, right, top, bottom
        self.parts: list[str] = []

    @property
    def plot_width(self) -> float:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> float:
        return self.height - self.top - self.bottom

    def add(self, element: str) -> None:
        self.parts.append(element)

    def text(self, x: float, y: float, text: str, *, anchor: str = "middle", size: int = 12, weight: str = "normal",
             rotate: bool = False, fill: str = "#222") -> None:
        transform = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if rotate else ""
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" font-weight="{weight}" '
                 f'fill="{fill}"{transform}>{escape(str(text))}</text>')

    def legend(self, labels: list[str], colors: list[str], *, dashed: list[bool] | None = None) -> None:
        """Above the plot area (the chart reserved `top` for it), one line per series."""
        x, y = self.left + 8, 44
        for i, (label, color) in enumerate(zip(labels, colors)):
            dash = ' stroke-dasharray="5 3"' if dashed and dashed[i] else ""
            self.add(f'<rect x="{x - 4}" y="{y + 16 * i - 10}" width="{9 + 7 * len(label)}" height="15" fill="white" '
                     f'fill-opacity="0.8"/>')
            self.add(f'<line x1="{x}" y1="{y + 16 * i - 3}" x2="{x + 16}" y2="{y + 16 * i - 3}" stroke="{color}" '
                     f'stroke-width="3"{dash}/>')
            self.text(x + 22, y + 16 * i + 1, label, anchor="start", size=11)

    def svg(self, kind: str) -> str:
        head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="plot plot-{kind}" width="{self.width}" '
                f'height="{self.height}" viewBox="0 0 {self.width} {self.height}" role="img" aria-label="{escape(self.title)}" '
                f'{FONT}><title>{escape(self.title)}</title><rect width="100%" height="100%" fill="white"/>')
        title = f'<text x="{self.width / 2:.1f}" y="20" text-anchor="middle" font-size="14" font-weight="600">{escape(self.title)}</text>'
        return head + title + "".join(self.parts) + "</svg>"

    def empty(self, kind: str, message: str = "no data") -> str:
        self.text(self.width / 2, self.height / 2, message, size=13, fill="#777")
        return self.svg(kind)


def _y_axis(c: _Canvas, ticks: list[float], to_y, label: str) -> None:
    for tick in ticks:
        y = to_y(tick)
        c.add(f'<line x1="{c.left}" y1="{y:.1f}" x2="{c.width - c.right}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        c.text(c.left - 6, y + 4, fmt(tick), anchor="end", size=11)
    c.add(f'<line x1="{c.left}" y1="{c.top}" x2="{c.left}" y2="{c.top + c.plot_height}" stroke="#333"/>')
    c.text(16, c.top + c.plot_height / 2, label, rotate=True)


def _x_axis_line(c: _Canvas, label: str) -> None:
    base = c.top + c.plot_height
    c.add(f'<line x1="{c.left}" y1="{base}" x2="{c.width - c.right}" y2="{base}" stroke="#333"/>')
    c.text(c.left + c.plot_width / 2, c.height - 10, label)


def line_chart(series: list[dict], *, title: str, x_label: str, y_label: str, log_x: bool = False, width: int = 560,
               height: int = 320) -> str:
    """`series`: [{"label", "points": [(x, y), ...], "dashed": bool}]; log_x puts x on a log2 axis (prompt lengths)."""
    c = _Canvas(width, height + 16 * len(series), title, top=40 + 16 * len(series))
    points = [(x, y) for s in series for x, y in s["points"] if y is not None]
    if not points:
        return c.empty("line")
    xs = sorted({x for x, _ in points})
    fx = (lambda v: math.log2(v)) if log_x else (lambda v: v)
    x_low, x_high = fx(xs[0]), fx(xs[-1])
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    ticks = nice_ticks(0, max(y for _, y in points) * 1.1)

    def to_x(v: float) -> float:
        return c.left + 12 + (fx(v) - x_low) / (x_high - x_low) * (c.plot_width - 24)

    def to_y(v: float) -> float:
        return c.top + c.plot_height - v / ticks[-1] * c.plot_height

    _y_axis(c, ticks, to_y, y_label)
    _x_axis_line(c, x_label)
    for x in xs:
        c.add(f'<line x1="{to_x(x):.1f}" y1="{c.top + c.plot_height}" x2="{to_x(x):.1f}" y2="{c.top + c.plot_height + 4}" '
              f'stroke="#333"/>')
        c.text(to_x(x), c.top + c.plot_height + 17, fmt(x), size=11)
    colors = []
    for i, s in enumerate(series):
        color = s.get("color") or PALETTE[i % len(PALETTE)]
        colors.append(color)
        pts = [(to_x(x), to_y(y)) for x, y in s["points"] if y is not None]
        dash = ' stroke-dasharray="6 4"' if s.get("dashed") else ""
        if len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            c.add(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2.5"{dash}/>')
        for x, y in pts:
            c.add(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"/>')
    c.legend([s["label"] for s in series], colors, dashed=[bool(s.get("dashed")) for s in series])
    return c.svg("line")


def histogram(series: list[dict], *, title: str, x_label: str, y_label: str = "steps", bins: int = 30,
              clip_percentile: float = 99.5, width: int = 560, height: int = 320) -> str:
    """`series`: [{"label", "values": [...]}], overlaid as outlined bars over shared bins; values above the
    `clip_percentile` of all values fall into the last bin (so one stall does not squash the plot)."""
    c = _Canvas(width, height + 16 * len(series), title, top=40 + 16 * len(series))
    values = sorted(v for s in series for v in s["values"])
    if not values:
        return c.empty("histogram")
    low = values[0]
    high = values[min(len(values) - 1, int(len(values) * clip_percentile / 100))]
    if high <= low:
        high = low + (abs(low) * 0.1 or 1.0)
    edges = nice_ticks(low, high, 6)
    low, high = edges[0], max(high, edges[-1])
    width_bin = (high - low) / bins
    counts = []
    for s in series:
        row = [0] * bins
        for v in s["values"]:
            row[min(max(int((v - low) / width_bin), 0), bins - 1)] += 1
        counts.append(row)
    ticks = nice_ticks(0, max(max(row) for row in counts) * 1.1)

    def to_x(v: float) -> float:
        return c.left + (v - low) / (high - low) * c.plot_width

    def to_y(v: float) -> float:
        return c.top + c.plot_height - v / ticks[-1] * c.plot_height

    _y_axis(c, ticks, to_y, y_label)
    _x_axis_line(c, x_label)
    for tick in edges:
        if low <= tick <= high:
            c.text(to_x(tick), c.top + c.plot_height + 17, fmt(tick), size=11)
    colors = []
    for i, row in enumerate(counts):
        color = PALETTE[i % len(PALETTE)]
        colors.append(color)
        for b, count in enumerate(row):
            if count:
                x0, x1 = to_x(low + b * width_bin), to_x(low + (b + 1) * width_bin)
                c.add(f'<rect x="{x0:.1f}" y="{to_y(count):.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
                      f'height="{to_y(0) - to_y(count):.1f}" fill="{color}" fill-opacity="0.45" stroke="{color}"/>')
    c.legend([s["label"] for s in series], colors)
    return c.svg("histogram")


def bar_chart(categories: list[str], series: list[dict], *, title: str, x_label: str, references: list[dict] = (),
              width: int = 560, height: int | None = None, value_format=fmt) -> str:
    """Horizontal bars: one group per category, one bar per series ({"label", "values", "hatched"}); `references`
    are vertical lines ({"value", "label"}), e.g. a memory budget."""
    rows = len(categories) * max(len(series), 1)
    height = height or 70 + 22 * rows + 12 * len(categories) + 16 * len(series)
    label_width = min(max((len(c) for c in categories), default=4) * 7 + 16, 200)
    c = _Canvas(width, height, title, left=label_width, right=60, top=34 + 16 * len(series), bottom=44)
    values = [v for s in series for v in s["values"] if v is not None] + [r["value"] for r in references if r.get("value")]
    if not values or not categories:
        return c.empty("bars")
    ticks = nice_ticks(0, max(values) * 1.05)

    def to_x(v: float) -> float:
        return c.left + v / ticks[-1] * c.plot_width

    for tick in ticks:
        c.add(f'<line x1="{to_x(tick):.1f}" y1="{c.top}" x2="{to_x(tick):.1f}" y2="{c.top + c.plot_height}" stroke="#e5e5e5"/>')
        c.text(to_x(tick), c.top + c.plot_height + 15, fmt(tick), size=11)
    _x_axis_line(c, x_label)
    c.add('<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
          '<rect width="6" height="6" fill="white"/><line x1="0" y1="0" x2="0" y2="6" stroke="#555" stroke-width="3"/>'
          '</pattern></defs>')
    group = c.plot_height / len(categories)
    bar = min(20.0, (group - 10) / max(len(series), 1))
    colors = []
    for si, s in enumerate(series):
        colors.append(s.get("color") or PALETTE[si % len(PALETTE)])
    for ci, category in enumerate(categories):
        y0 = c.top + ci * group + (group - bar * len(series)) / 2
        c.text(c.left - 8, c.top + ci * group + group / 2 + 4, category, anchor="end", size=11)
        for si, s in enumerate(series):
            value = s["values"][ci]
            if value is None:
                continue
            y = y0 + si * bar
            fill = "url(#hatch)" if s.get("hatched") else colors[si]
            c.add(f'<rect x="{c.left}" y="{y:.1f}" width="{max(to_x(value) - c.left, 1):.1f}" height="{bar - 2:.1f}" '
                  f'fill="{fill}" stroke="{colors[si]}" stroke-width="1.5"/>')
            c.text(to_x(value) + 4, y + bar / 2 + 3, value_format(value), anchor="start", size=10)
    for ref in references:
        if ref.get("value"):
            x = to_x(ref["value"])
            c.add(f'<line x1="{x:.1f}" y1="{c.top - 4}" x2="{x:.1f}" y2="{c.top + c.plot_height}" stroke="#000" '
                  f'stroke-width="2" stroke-dasharray="6 3"/>')
            c.text(x - 4, c.top + c.plot_height - 6, ref["label"], anchor="end", size=11, weight="600")
    # the legend sits above the plot area, one line per series
    for si, s in enumerate(series):
        y = 34 + 16 * si
        fill = "url(#hatch)" if s.get("hatched") else colors[si]
        c.add(f'<rect x="{c.left}" y="{y - 9}" width="16" height="11" fill="{fill}" stroke="{colors[si]}"/>')
        c.text(c.left + 22, y + 1, s["label"], anchor="start", size=11)
    return c.svg("bars")


def stacked_bars(rows: list[tuple[str, dict[str, float]]], order: list[str], *, title: str, x_label: str,
                 width: int = 560) -> str:
    """One horizontal bar per row, split into the parts `order` names (a legend below), e.g. a step's phases."""
    label_width = min(max((len(r[0]) for r in rows), default=4) * 7 + 16, 200)
    legend_rows = math.ceil(len(order) / 4)
    height = 60 + 34 * len(rows) + 18 * legend_rows + 20
    c = _Canvas(width, height, title, left=label_width, right=24, top=34, bottom=40 + 18 * legend_rows)
    totals = [sum(parts.get(k, 0.0) for k in order) for _, parts in rows]
    if not rows or not any(totals):
        return c.empty("stacked")
    ticks = nice_ticks(0, max(totals) * 1.02)

    def to_x(v: float) -> float:
        return c.left + v / ticks[-1] * c.plot_width

    for tick in ticks:
        c.add(f'<line x1="{to_x(tick):.1f}" y1="{c.top}" x2="{to_x(tick):.1f}" y2="{c.top + c.plot_height}" stroke="#e5e5e5"/>')
        c.text(to_x(tick), c.top + c.plot_height + 15, fmt(tick), size=11)
    base = c.top + c.plot_height
    c.add(f'<line x1="{c.left}" y1="{base}" x2="{c.width - c.right}" y2="{base}" stroke="#333"/>')
    c.text(c.left + c.plot_width / 2, base + 32, x_label)
    band = c.plot_height / len(rows)
    for ri, (label, parts) in enumerate(rows):
        y = c.top + ri * band + band * 0.2
        c.text(c.left - 8, y + band * 0.3 + 4, label, anchor="end", size=11)
        x = 0.0
        for ki, key in enumerate(order):
            value = parts.get(key, 0.0)
            if value > 0:
                c.add(f'<rect x="{to_x(x):.1f}" y="{y:.1f}" width="{max(to_x(x + value) - to_x(x), 0.5):.1f}" '
                      f'height="{band * 0.6:.1f}" fill="{PALETTE[ki % len(PALETTE)]}"><title>{escape(key)}: '
                      f'{fmt(value)}</title></rect>')
            x += value
    for ki, key in enumerate(order):
        lx, ly = c.left + (ki % 4) * (c.plot_width / 4), base + 50 + 18 * (ki // 4)
        c.add(f'<rect x="{lx:.1f}" y="{ly - 10}" width="12" height="12" fill="{PALETTE[ki % len(PALETTE)]}"/>')
        c.text(lx + 16, ly, key, anchor="start", size=11)
    return c.svg("stacked")
