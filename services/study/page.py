"""The study report as one self-contained HTML page (no script, no outside file): the
flow, the accuracy tables with their intervals, the ROC curves (inline SVG), the SBR of
each margin by pathology per group, and, in an operator's report, the comparative
outcomes (margins among arms, recurrence, adverse events) for the study's data monitoring.
It is written to a file by ``nirfctl report --html FILE``; the surgical display never
shows it."""

from __future__ import annotations

import html
from typing import Mapping

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")
_CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: right; }
th { background: #eef; } td.l, th.l { text-align: left; }
.note { color: #555; font-size: 12px; max-width: 900px; }
.plots { display: flex; flex-wrap: wrap; gap: 24px; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _num(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ci(ci) -> str:
    return "-" if not ci else f"{ci[0]:.3f}-{ci[1]:.3f}"


def _accuracy_table(groups: list[Mapping]) -> str:
    rows = ["<tr><th class=l>histology</th><th class=l>arm</th><th>TP</th><th>FP</th><th>TN</th><th>FN</th>"
            "<th class=l>measure</th><th>value</th><th>Clopper-Pearson</th><th>Wilson</th>"
            "<th>cluster-adjusted</th></tr>"]
    for g in groups:
        c = g["counts"]
        for i, name in enumerate(("sensitivity", "specificity", "ppv", "npv")):
            m = g["metrics"][name]
            head = (f"<td class=l rowspan=4>{_e(g['histology'])}</td><td class=l rowspan=4>{_e(g['arm'])}</td>"
                    f"<td rowspan=4>{c['tp']}</td><td rowspan=4>{c['fp']}</td><td rowspan=4>{c['tn']}</td>"
                    f"<td rowspan=4>{c['fn']}</td>") if i == 0 else ""
            rows.append(f"<tr>{head}<td class=l>{name} ({m['k']}/{m['n']})</td><td>{_num(m['value'])}</td>"
                        f"<td>{_ci(m['clopper_pearson'])}</td><td>{_ci(m['wilson'])}</td>"
                        f"<td>{_ci(m.get('cluster_adjusted'))}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def roc_svg(roc: list[Mapping], size: int = 360) -> str:
    """The ROC curves as an SVG: one step line per group, the chance diagonal, axes."""
    pad = 44
    inner = size - 2 * pad

    def xy(fpr: float, tpr: float) -> str:
        return f"{pad + fpr * inner:.1f},{pad + (1 - tpr) * inner:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size + 330}" height="{size}" '
             f'role="img" aria-label="ROC curves">',
             f'<rect x="{pad}" y="{pad}" width="{inner}" height="{inner}" fill="#fafafa" stroke="#444"/>',
             f'<line x1="{pad}" y1="{pad + inner}" x2="{pad + inner}" y2="{pad}" stroke="#aaa" stroke-dasharray="4 4"/>']
    for i in range(0, 11, 2):
        v = i / 10
        parts.append(f'<text x="{pad + v * inner:.1f}" y="{pad + inner + 16}" font-size="11" '
                     f'text-anchor="middle">{v:.1f}</text>')
        parts.append(f'<text x="{pad - 6}" y="{pad + (1 - v) * inner + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{v:.1f}</text>')
    parts.append(f'<text x="{pad + inner / 2}" y="{size - 6}" font-size="12" text-anchor="middle">'
                 f'1 - specificity</text>')
    parts.append(f'<text x="12" y="{pad + inner / 2}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 12 {pad + inner / 2})">sensitivity</text>')
    for k, curve in enumerate(roc):
        colour = _COLOURS[k % len(_COLOURS)]
        pts = curve.get("points") or []
        path = [xy(0.0, 0.0)]
        for fpr, tpr, _t in pts[1:]:
            path.append(xy(fpr, tpr))
        path.append(xy(1.0, 1.0))
        if curve.get("auc") is not None:  # one class only: no curve to draw
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(path)}"/>')
        label = f"{curve['histology']} / {curve['arm']}: AUC {_num(curve.get('auc'))} ({_ci(curve.get('auc_ci'))})"
        y = pad + 14 + 18 * k
        parts.append(f'<rect x="{size - pad + 50}" y="{y - 9}" width="12" height="4" fill="{colour}"/>')
        parts.append(f'<text x="{size - pad + 66}" y="{y - 4}" font-size="11">{_e(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def sbr_svg(groups: list[Mapping], threshold_lines: list[float], width: int = 560, height: int = 300) -> str:
    """SBR of each scored margin by pathology (negative, positive), one column pair per
    histology and arm; the thresholds in force as dashed lines."""
    pad_l, pad_b, pad_t = 50, 60, 20
    values = [v for g in groups for v in g["positive"] + g["negative"]] + list(threshold_lines)
    top = max(values + [2.0]) * 1.1
    plot_h = height - pad_b - pad_t
    n_cols = max(1, 2 * len(groups))
    col_w = (width - pad_l - 10) / n_cols

    def y(v: float) -> float:
        return pad_t + (1 - v / top) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="SBR by pathology">',
             f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + plot_h}" stroke="#444"/>',
             f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{width - 10}" y2="{pad_t + plot_h}" stroke="#444"/>']
    for i in range(6):
        v = top * i / 5
        parts.append(f'<text x="{pad_l - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end">{v:.1f}</text>')
    for t in threshold_lines:
        parts.append(f'<line x1="{pad_l}" y1="{y(t):.1f}" x2="{width - 10}" y2="{y(t):.1f}" stroke="#888" '
                     f'stroke-dasharray="5 3"/>')
    for gi, g in enumerate(groups):
        for j, (name, colour) in enumerate((("negative", "#1f77b4"), ("positive", "#d62728"))):
            col = 2 * gi + j
            cx = pad_l + (col + 0.5) * col_w
            for k, v in enumerate(g[name]):
                jitter = ((k * 37) % 11 - 5) * col_w / 40
                parts.append(f'<circle cx="{cx + jitter:.1f}" cy="{y(v):.1f}" r="3.5" fill="{colour}" '
                             f'fill-opacity="0.7"/>')
            parts.append(f'<text x="{cx:.1f}" y="{pad_t + plot_h + 14}" font-size="10" text-anchor="middle">'
                         f'{name} ({len(g[name])})</text>')
        parts.append(f'<text x="{pad_l + (2 * gi + 1) * col_w:.1f}" y="{pad_t + plot_h + 30}" font-size="11" '
                     f'text-anchor="middle">{_e(g["histology"])} / {_e(g["arm"])}</text>')
    parts.append(f'<text x="14" y="{pad_t + plot_h / 2}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 14 {pad_t + plot_h / 2})">SBR</text>')
    parts.append("</svg>")
    return "".join(parts)


def render(report: Mapping, title: str = "NIRF study report") -> str:
    """The whole page as an HTML string."""
    flow = report.get("flow", {})
    out = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"]
    if report.get("threshold") is not None:
        out.append(f"<p>Every call re-scored at SBR threshold {report['threshold']:g} "
                   f"(intensity and CNR floors as stored with each capture).</p>")
    else:
        thresholds = ", ".join(f"{k} ({v} margins)" for k, v in report.get("thresholds_in_force", {}).items())
        out.append(f"<p>Calls as made at capture; thresholds in force: {_e(thresholds or '-')}.</p>")
    thresholds = sorted({float(k) for k in report.get("thresholds_in_force", {}) if k != "null"})
    if report.get("threshold") is not None:
        thresholds = [float(report["threshold"])]
    out.append("<h2>ROC curves and SBR by pathology</h2><div class=plots>")
    out.append(roc_svg(report.get("roc", [])))
    out.append(sbr_svg(report.get("sbr_by_pathology", []), thresholds))
    out.append("</div>")
    out.append("<h2>Flow</h2><table>")
    enrolled = flow.get("enrolled", {})
    out.append("".join(f"<tr><td class=l>enrolled, {_e(a)}</td><td>{n}</td></tr>" for a, n in enrolled.items()))
    for key in ("imaged", "captures", "tumor_bed_captures", "margins", "retakes", "scored_margins",
                "without_pathology", "close", "indeterminate", "patients_scored",
                "patients_without_margin_status", "window_deviations"):
        if key in flow:
            out.append(f"<tr><td class=l>{_e(key.replace('_', ' '))}</td><td>{flow[key]}</td></tr>")
    for reason, n in flow.get("not_evaluable", {}).items():
        out.append(f"<tr><td class=l>not evaluable: {_e(reason.replace('_', ' '))}</td><td>{n}</td></tr>")
    out.append("</table>")
    out.append("<h2>Diagnostic accuracy per margin (ICG arms)</h2>" + _accuracy_table(report.get("groups", [])))
    out.append("<h2>Diagnostic accuracy per patient</h2>" + _accuracy_table(report.get("per_patient", [])))
    if "margins_by_arm" in report:
        out.append("<h2>Positive margins among the arms (data monitoring)</h2><table><tr><th class=l>histology</th>"
                   "<th class=l>arm</th><th>positive</th><th>n</th><th class=l>test</th><th>p</th></tr>")
        for m in report["margins_by_arm"]:
            for i, a in enumerate(m["arms"]):
                test = (f"<td class=l rowspan={len(m['arms'])}>{_e(m['test']['method'])}</td>"
                        f"<td rowspan={len(m['arms'])}>{_num(m['test']['p'], 4)}</td>") if i == 0 else ""
                out.append(f"<tr><td class=l>{_e(m['histology'])}</td><td class=l>{_e(a['arm'])}</td>"
                           f"<td>{a['positive']}</td><td>{a['n']}</td>{test}</tr>")
        out.append("</table>")
    if "recurrence" in report:
        out.append("<h2>Local recurrence at 24 months (data monitoring)</h2><table><tr><th class=l>histology</th>"
                   "<th class=l>arm</th><th>n</th><th>with follow-up</th><th>events</th><th>1 - S(730.5 d)</th>"
                   "<th>95 % interval</th><th>log-rank p</th></tr>")
        for r in report["recurrence"]:
            for i, a in enumerate(r["arms"]):
                p = f"<td rowspan={len(r['arms'])}>{_num(r['logrank_p'], 4)}</td>" if i == 0 else ""
                out.append(f"<tr><td class=l>{_e(r['histology'])}</td><td class=l>{_e(a['arm'])}</td><td>{a['n']}</td>"
                           f"<td>{a['with_followup']}</td><td>{a['events']}</td><td>{_num(a['km_24m'])}</td>"
                           f"<td>{_ci(a['km_24m_ci'])}</td>{p}</tr>")
        out.append("</table>")
    if "adverse_events" in report:
        out.append("<h2>Adverse events (data monitoring)</h2><table><tr><th class=l>arm</th><th>n</th>"
                   "<th>with any AE</th>" + "".join(f"<th>worst grade {g}</th>" for g in range(1, 6)) + "</tr>")
        for a in report["adverse_events"]:
            out.append(f"<tr><td class=l>{_e(a['arm'])}</td><td>{a['n']}</td><td>{a['patients_with_ae']}</td>"
                       + "".join(f"<td>{a['by_grade'].get(str(g), 0)}</td>" for g in range(1, 6)) + "</tr>")
        out.append("</table>")
    if report.get("deviations"):
        out.append("<h2>Protocol deviations</h2><table><tr><th class=l>centre</th><th class=l>case</th>"
                   "<th class=l>kind</th><th class=l>detail</th></tr>")
        for d in report["deviations"]:
            out.append(f"<tr><td class=l>{_e(d.get('centre_id'))}</td><td class=l>{_e(d.get('case_id'))}</td>"
                       f"<td class=l>{_e(d.get('kind'))}</td><td class=l>{_e(d.get('message'))}</td></tr>")
        out.append("</table>")
    out.append("<h2>Methods</h2><table>")
    for name, text in report.get("methods", {}).items():
        out.append(f"<tr><td class=l>{_e(name)}</td><td class=l>{_e(text)}</td></tr>")
    out.append("</table><p class=note>For the study's data monitoring; the trial's statistical analysis plan "
               "governs the final analysis.</p></body></html>")
    return "".join(out)
