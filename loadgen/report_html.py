"""Renders a load test's ReportData as one self-contained HTML file (plotly.js and data inlined)."""
from __future__ import annotations

import html
import json
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from loadgen.report import Distribution, ReportData

IDLE_COLOR = "#d62728"
BAR_COLOR = "#1f77b4"
_PERCENTILE_STYLE = {"p50": ("#2ca02c", "dash"), "p90": ("#ff7f0e", "dash"),
                     "p99": ("#d62728", "dot")}
_PLOT_CONFIG = {"displaylogo": False, "responsive": True}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.warning { background: #fdecea; border-left: 4px solid #d62728; padding: 0.4em 0.8em; margin: 0.3em 0; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.muted { color: #777; }
"""


def _short(node: str, width: int = 12) -> str:
    return node if len(node) <= width else node[:width] + "…"


def _value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return "-" if value is None else str(value)


def _table(rows: dict[str, Any]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(_value(value))}</td></tr>"
                   for key, value in rows.items())
    return f"<table>{body}</table>"


def _figure_html(figure: Any, div_id: str) -> str:
    return pio.to_html(figure, include_plotlyjs=False, full_html=False, div_id=div_id,
                       config=_PLOT_CONFIG)


def _latency_figure(dist: Distribution):
    edges, counts = dist.histogram.edges, dist.histogram.counts
    centers = [(low + high) / 2 for low, high in zip(edges, edges[1:])]
    widths = [max(high - low, 1e-9) for low, high in zip(edges, edges[1:])]
    figure = go.Figure(go.Bar(x=centers, y=counts, width=widths, marker_color=BAR_COLOR,
                              name="requests", hovertemplate="%{x:.2f} ms: %{y}<extra></extra>"))
    # Labels at staggered heights: p90 and p99 often fall on the same bin.
    for height, (label, (color, dash)) in zip((1.0, 0.9, 0.8), _PERCENTILE_STYLE.items()):
        value = getattr(dist.stats, label)
        if value is not None:
            figure.add_vline(x=value * 1000, line_color=color, line_dash=dash,
                             annotation_text=f"{label} {value * 1000:.1f} ms",
                             annotation_position="top right", annotation_y=height,
                             annotation_font_color=color)
    figure.update_layout(title=f"{dist.title} ({dist.stats.count} samples)",
                         xaxis_title="ms", yaxis_title="count", bargap=0.02, height=340,
                         margin={"t": 50, "b": 40, "l": 50, "r": 20}, showlegend=False)
    return figure


def _mark(figure: Any, data: ReportData) -> None:
    """A dashed vertical line, labelled, at each marker (a chaos run's faults)."""
    for marker in data.markers:
        figure.add_vline(x=marker.at_s, line_dash="dash", line_color="#b22222",
                         annotation_text=marker.label, annotation_textangle=-90,
                         annotation_position="top left")


def _timeline_figure(data: ReportData):
    line = data.timeline
    x = [start + line.bucket_s / 2 for start in line.starts]
    figure = make_subplots(specs=[[{"secondary_y": True}]])
    figure.add_trace(go.Scatter(x=x, y=line.throughput, name="successful req/s", mode="lines+markers"),
                     secondary_y=False)
    figure.add_trace(go.Scatter(x=x, y=line.output_tokens_per_s, name="output tok/s",
                                mode="lines", line={"dash": "dot"}, visible="legendonly"),
                     secondary_y=False)
    figure.add_trace(go.Scatter(x=x, y=line.in_flight_max, name="in flight (max)",
                                mode="lines", line={"shape": "hv"}), secondary_y=True)
    _mark(figure, data)
    figure.update_layout(title=f"Throughput and requests in flight ({line.bucket_s:g} s buckets)",
                         xaxis_title="seconds since start", height=380,
                         margin={"t": 50, "b": 40, "l": 50, "r": 50})
    figure.update_yaxes(title_text="per second", secondary_y=False, rangemode="tozero")
    figure.update_yaxes(title_text="in flight", secondary_y=True, rangemode="tozero",
                        tickmode="auto", showgrid=False)
    return figure


def _nodes_figure(data: ReportData):
    bars = data.nodes
    labels = [_short(bar.node) for bar in bars]
    hover = [f"{bar.node}<br>{bar.answers} answers ({bar.share * 100:.1f}%)"
             + ("" if bar.replicas is None else f"<br>{bar.replicas} replica(s)")
             + ("<br>IDLE: holds replicas, answered nothing" if bar.idle else "")
             for bar in bars]
    text = [("0 — IDLE" if bar.idle else f"{bar.answers} ({bar.share * 100:.1f}%)") for bar in bars]
    figure = go.Figure(go.Bar(
        x=labels, y=[bar.answers for bar in bars], text=text, textposition="outside",
        marker_color=[IDLE_COLOR if bar.idle else BAR_COLOR for bar in bars],
        textfont_color=[IDLE_COLOR if bar.idle else "#222" for bar in bars],
        hovertext=hover, hoverinfo="text", cliponaxis=False,
        customdata=[bar.node for bar in bars]))
    most = max([bar.answers for bar in bars] + [1])
    figure.update_layout(title="Answers per node", yaxis_title="successful answers",
                         yaxis_range=[0, most * 1.15], height=360,
                         margin={"t": 50, "b": 40, "l": 50, "r": 20})
    return figure


def _errors_figure(data: ReportData):
    line = data.timeline
    x = [start + line.bucket_s / 2 for start in line.starts]
    figure = go.Figure([go.Bar(x=x, y=counts, name=kind, width=line.bucket_s * 0.9)
                        for kind, counts in line.errors.items()])
    _mark(figure, data)
    figure.update_layout(barmode="stack", title="Failures over time, by kind",
                         xaxis_title="seconds since start", yaxis_title="failures", height=320,
                         margin={"t": 50, "b": 40, "l": 50, "r": 20})
    return figure


def _errors_table(data: ReportData) -> str:
    rows = "".join(f"<tr><td>{html.escape(e.kind)}</td><td>{e.status or '-'}</td><td>{e.count}</td>"
                   f"<td>{html.escape(e.sample)}</td></tr>" for e in data.errors)
    return ("<table><tr><th>kind</th><th>HTTP status</th><th>count</th><th>sample message</th></tr>"
            f"{rows}</table>")


def render_html(data: ReportData, text_summary: str) -> str:
    """The report page; `text_summary` is load_test.py's own end-of-run table, shown verbatim."""
    sections = [f"<h1>{html.escape(data.title)}</h1>"]
    sections += [f'<div class="warning">WARNING: {html.escape(w)}</div>' for w in data.warnings]
    sections.append('<div class="grid"><div><h2>Run settings</h2>' + _table(data.settings)
                    + '</div><div><h2>Server (as it reports itself over HTTP)</h2>'
                    + (_table(data.server) if data.server else
                       '<p class="muted">the service answered neither GET /nodes nor GET /v1/models</p>')
                    + "</div></div>")
    sections.append(f"<h2>Summary</h2><pre>{html.escape(text_summary)}</pre>")
    sections.append('<h2>Latency</h2><div class="grid">')
    for dist in data.distributions:
        if dist.histogram.counts:
            sections.append(f"<div>{_figure_html(_latency_figure(dist), f'latency-{dist.key}')}</div>")
        else:
            sections.append(f'<p class="muted">{html.escape(dist.title)}: no samples</p>')
    sections.append("</div>")
    sections.append("<h2>Over time</h2>" + _figure_html(_timeline_figure(data), "timeline"))
    sections.append("<h2>Per node</h2>")
    if data.nodes:
        sections.append(_figure_html(_nodes_figure(data), "per-node"))
    else:
        sections.append('<p class="muted">no node answered and the service listed none</p>')
    sections.append("<h2>Errors</h2>")
    if data.errors:
        sections.append(_errors_table(data) + _figure_html(_errors_figure(data), "errors-over-time"))
    else:
        sections.append("<p>none</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(data.title)}</title><style>{_CSS}</style>"
            f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head><body>"
            + "\n".join(sections) + "</body></html>\n")


def write_report(path: str, data: ReportData, text_summary: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render_html(data, text_summary))
