"""report.html: the report's tables as HTML tables, a 95 % interval bar beside every interval,
and the curves inline as PNG data URIs, in one file with no external resources and no script.

Built from the report's data (``bbpt.report.build``) with the texts report.md uses, so both say
the same. Bars: a dot at the mean and a line over the 95 % interval, on one scale per column
(accuracies) or per table (differences, with a line at 0: green above 0, red below, grey across).
"""
from __future__ import annotations

import base64
import re
import statistics
from html import escape

from .report import interval_text, against_text, b2n_text, captions, failure_text, grid, holds, reach_text

W, H, PAD = 130, 14, 5  # a bar's size in px (the paired table's: WIDE)
WIDE = 240

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Liberation Sans",sans-serif;color:#1f2328;
margin:24px auto;max-width:1500px;padding:0 20px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 6px;border-bottom:1px solid #d0d7de;padding-bottom:3px}
p.cap{margin:4px 0 10px;color:#424a53}p.note{background:#fff8c5;border:1px solid #d4a72c;padding:6px 10px}
.wrap{overflow-x:auto}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;margin:4px 0 8px}
th,td{border:1px solid #d0d7de;padding:4px 8px;vertical-align:top}
th{background:#f6f8fa;text-align:center;font-weight:600}td{text-align:right;white-space:nowrap}
td.l{text-align:left;font-weight:600}tbody tr:nth-child(even){background:#fafbfc}
tbody+tbody{border-top:2px solid #8c959f}tr.avg td{font-weight:600}
svg.iv{display:block;margin:3px 0 0 auto}td>svg.iv:only-child{margin:2px auto}
.scale{display:block;font-weight:400;font-size:11px;color:#656d76}
.failed{color:#cf222e;font-weight:600}.none{color:#8c959f}
.yes{color:#1a7f37;font-weight:600}.no{color:#cf222e;font-weight:600}.unclear{color:#656d76}
ul.failed-runs li{font-family:ui-monospace,monospace;font-size:12px}
code{font-family:ui-monospace,monospace;background:#f6f8fa;padding:0 3px;border-radius:3px}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:16px}
figure{margin:0}figure img{max-width:100%;height:auto;border:1px solid #d0d7de}
figcaption{font-weight:600;margin-bottom:4px}
"""
COLOUR = {"yes": "#1a7f37", "no": "#cf222e", "unclear": "#6e7781", "-": "#6e7781", None: "#0969da"}


def _inline(text: str) -> str:
    """A caption's text as HTML: escaped, with its **bold** and `code`."""
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escape(text))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def _span(values: list[float], zero: bool = False) -> tuple[float, float]:
    """The scale a set of bars shares: every value (and 0 for differences), with a margin."""
    lo, hi = min(values + [0.0] * zero), max(values + [0.0] * zero)
    if hi - lo < 1:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def _ends(iv: dict) -> list[float]:
    return list(iv["ci95"]) if iv["ci95"] else [iv["mean"]]


def bar(iv: dict, scale: tuple[float, float], zero: bool = False, w: int = W) -> str:
    """An inline SVG: the 95 % interval as a line, the mean as a dot, 0 as a vertical line (zero=True)."""
    lo, hi = scale

    def x(v: float) -> float:
        return round(PAD + (v - lo) / (hi - lo) * (w - 2 * PAD), 1)

    verdict = holds(iv) if zero else None
    c, y = COLOUR[verdict], H / 2
    tip = f"mean {iv['mean']:.1f}" + (f", 95 % CI [{iv['ci95'][0]:.1f}, {iv['ci95'][1]:.1f}]" if iv["ci95"] else ", n=1")
    parts = [f"<title>{escape(tip)}</title>", f"<line x1='{PAD}' x2='{w - PAD}' y1='{y}' y2='{y}' stroke='#d0d7de'/>"]
    if zero:
        parts.append(f"<line x1='{x(0)}' x2='{x(0)}' y1='0' y2='{H}' stroke='#57606a' stroke-dasharray='2 1'/>")
    if iv["ci95"]:
        a, b = x(iv["ci95"][0]), x(iv["ci95"][1])
        parts.append(f"<line x1='{a}' x2='{b}' y1='{y}' y2='{y}' stroke='{c}' stroke-width='4' stroke-linecap='round'"
                     " stroke-opacity='0.55'/>")
    parts.append(f"<circle cx='{x(iv['mean'])}' cy='{y}' r='3' fill='{c}'/>")
    return (f"<svg class='iv' width='{w}' height='{H}' viewBox='0 0 {w} {H}' role='img' "
            f"aria-label='{escape(tip)}'>" + "".join(parts) + "</svg>")


def _cell(text: str, iv: dict | None = None, scale=None, zero: bool = False) -> str:
    return f"<td>{_inline(text)}" + (bar(iv, scale, zero) if iv else "") + "</td>"


def _scale_note(scale: tuple[float, float]) -> str:
    return f"<span class='scale'>bar scale {scale[0]:.0f} to {scale[1]:.0f}</span>"


def _accuracy(rep: dict, pick, text, avg_of) -> str:
    """The method × dataset table; pick(row) is the interval a cell's bar draws, text(row) its text."""
    ds, rows = rep["datasets"], grid(rep)
    scales = [_span([v for g in rows if isinstance(g["cells"][i], dict) for v in _ends(pick(g["cells"][i]))] or [0.0])
              for i in range(len(ds))]
    head = "".join(f"<th>{escape(d)}{_scale_note(s)}</th>" for d, s in zip(ds, scales))
    out = ["<div class='wrap'><table><thead><tr><th>method</th>" + head
           + ("<th>average</th>" if len(ds) > 1 else "") + "<th>api_calls spent</th></tr></thead><tbody>"]
    for g in rows:
        tds = [_cell(text(c), pick(c), s) if isinstance(c, dict) else
               f"<td class='{'failed' if c else 'none'}'>{c or '-'}</td>" for c, s in zip(g["cells"], scales)]
        if len(ds) > 1:
            tds.append(f"<td>{statistics.mean(avg_of(c) for c in g['cells']):.1f}</td>" if g["complete"] else
                       "<td class='none'>-</td>")
        out.append(f"<tr><td class='l'>{escape(g['label'])}</td>" + "".join(tds) + f"<td>{g['calls']}</td></tr>")
    return "".join(out) + "</tbody></table></div>"


def _against(rep: dict) -> str:
    ds, rows = rep["datasets"], rep["against"]["rows"]
    cols = ds + (["average"] if len(ds) > 1 else [])

    def get(r, d):
        return r["average"] if d == "average" else r["datasets"].get(d)

    scale = _span([v for r in rows for d in cols if get(r, d) for v in _ends(get(r, d)["diff"])], zero=True)
    out = ["<div class='wrap'><table><thead><tr><th>method</th>"
           + "".join(f"<th>{escape(d)}{_scale_note(scale)}</th>" for d in cols) + "</tr></thead><tbody>"]
    for r in rows:
        tds = [_cell(against_text(q), q["diff"], scale, zero=True) if q else "<td class='none'>-</td>"
               for q in (get(r, d) for d in cols)]
        out.append(f"<tr><td class='l'>{escape(r['label'])}</td>" + "".join(tds) + "</tr>")
    return "".join(out) + "</tbody></table></div>"


def _paired(rep: dict) -> str:
    groups = [(p, p["datasets"] + ([p["average"]] if p["average"] else [])) for p in rep["paired"]]
    scale = _span([v for _, qs in groups for q in qs for v in _ends(q["diff"])], zero=True)
    out = ["<div class='wrap'><table><thead><tr><th>A − B</th><th>dataset</th><th>seeds</th>"
           f"<th>difference [95 % CI]</th><th>interval{_scale_note(scale)}</th><th>holds</th>"
           "<th>A reaches B's final val at (B spent)</th></tr></thead>"]
    for p, qs in groups:
        out.append(f"<tbody><tr><td class='l' rowspan='{len(qs)}'>{escape(p['a'])} − {escape(p['b'])}</td>")
        for i, q in enumerate(qs):
            h = holds(q["diff"])
            out.append(("" if i == 0 else f"<tr{' class=avg' if q is p['average'] else ''}>")
                       + f"<td class='l'>{escape(q['dataset'])}</td><td>{','.join(map(str, q['seeds']))}</td>"
                       f"<td>{interval_text(q['diff'])}</td><td>{bar(q['diff'], scale, zero=True, w=WIDE)}</td>"
                       f"<td class='{'unclear' if h == '-' else h}'>{h}</td><td>{escape(reach_text(q.get('reach')))}</td>"
                       "</tr>")
        out.append("</tbody>")
    return "".join(out) + "</table></div>"


def page(rep: dict, pngs: dict[str, bytes]) -> str:
    """The whole report.html; pngs: each dataset's curve plot."""
    cap = captions(rep)
    body = ["<h1>bbpt report</h1>", f"<p class='cap'>{rep['finished']} finished runs under <code>{escape(rep['root'])}"
            "</code>. Bars: the 95 % interval over seeds (line) and the mean (dot); in difference tables the dashed "
            "line is 0 and a bar is green when its interval lies above 0, red below, grey when it covers 0.</p>"]
    if "subset" in cap:
        body.append(f"<p class='note'>{_inline(cap['subset'])}</p>")
    body += ["<h2>Accuracy</h2>", f"<p class='cap'>{_inline(cap['accuracy'])}</p>",
             _accuracy(rep, lambda r: r["test"], lambda r: interval_text(r["test"]), lambda r: r["test"]["mean"])]
    if rep.get("failed"):
        body += [f"<p class='cap'>{_inline(cap['failed'])}</p><ul class='failed-runs'>"]
        body += [f"<li>{escape(failure_text(f))}</li>" for f in rep["failed"]] + ["</ul>"]
    if rep["metric"] == "H":
        body += ["<h2>Base-to-new</h2>", f"<p class='cap'>{_inline(cap['b2n'])}</p>",
                 _accuracy(rep, lambda r: r["b2n"]["H"], b2n_text, lambda r: r["b2n"]["H"]["mean"])]
    if rep.get("against") and rep["against"]["rows"]:
        body += [f"<h2>Against {escape(rep['against']['name'])}</h2>", f"<p class='cap'>{_inline(cap['against'])}</p>",
                 _against(rep)]
    if rep["paired"]:
        body += ["<h2>Paired differences</h2>", f"<p class='cap'>{_inline(cap['paired'])}</p>", _paired(rep)]
    if pngs:
        body.append("<h2>Validation accuracy against api_calls</h2><div class='plots'>")
        for d, png in pngs.items():
            src = "data:image/png;base64," + base64.b64encode(png).decode()
            body.append(f"<figure><figcaption>{escape(d)}</figcaption><img alt='curve {escape(d)}' src='{src}'>"
                        "</figure>")
        body.append("</div>")
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>bbpt report: {escape(rep['root'])}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "\n</body></html>\n")
