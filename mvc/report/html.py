"""One self-contained HTML file from report data (data.py): plotly charts, plotly.js inlined once,
every chart followed by its numbers as a table. Nothing is fetched when the file is opened."""

from __future__ import annotations

import html
import json
import time

from ..errors import MissingExtraError
from .data import Report

OP_COLORS = {"shed": "#8c564b", "prune": "#d62728", "heal": "#2ca02c", "quantize": "#1f77b4",
             "factorize": "#9467bd", "merge": "#7f7f7f", None: "#444444"}
_CONFIG = {"displaylogo": False, "responsive": True}


def _plotly():
    try:
        import plotly.graph_objects as go
        from plotly.offline import get_plotlyjs
    except ImportError as e:
        raise MissingExtraError("mvc report", "plotly", extra="report") from e
    return go, get_plotlyjs


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _t(x) -> str:
    """Text for a chart (plotly reads a few HTML tags in labels): escaped, bounded."""
    return html.escape(str(x)[:200], quote=False)


def _human(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return _e(v)


def _table(headers: list[str], rows: list[list], caption: str) -> str:
    head = "".join(f"<th scope=col>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return (f"<details class=data><summary>{_e(caption)} (table)</summary><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></details>")


class _Page:
    def __init__(self):
        self.go, self._js = _plotly()
        self.parts: list[str] = []
        self._n = 0

    def chart(self, section: str, fig, label: str, table: str) -> None:
        self._n += 1
        fig.update_layout(template="plotly_white", margin={"l": 60, "r": 20, "t": 50, "b": 60},
                          title={"text": _t(label)}, font={"size": 12})
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{self._n}", config=_CONFIG)
        self.parts.append(f'<figure class=chart data-section="{section}" role=group aria-label="{_e(label)}">'
                          f"{div}{table}</figure>")

    def add(self, text: str) -> None:
        self.parts.append(text)

    def html(self, title: str) -> str:
        return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
                f"<meta name=viewport content='width=device-width, initial-scale=1'><style>{_CSS}</style>"
                f"<script>{self._js()}</script></head><body>{''.join(self.parts)}</body></html>")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:0 24px 48px;color:#222}
h1{margin:24px 0 4px}h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
nav a{margin-right:14px}figure.chart{margin:16px 0}details.data{margin:4px 0 0 8px;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f4f4f4}code{font-size:12px}.attempt{color:#b00}.muted{color:#777}pre{white-space:pre-wrap;margin:0;font-size:12px}
"""


def _label(c) -> str:
    op = (c.op or {}).get("op")
    return _t(f"{c.id[:12]} {op or 'commit'}" + (" (rejected)" if c.status == "attempt" else ""))


# -- sections ---------------------------------------------------------------------
def _timeline(p: _Page, rep: Report) -> None:
    go = p.go
    cs = [c for c in rep.commits if c.metric is not None]
    if not cs:
        return
    metric = rep.metric
    p.add(f"<h2 id=timeline>Compression timeline</h2><p>Each point is a commit: its {metric} against its "
          "position in the history, the size of its weights and the bytes the store holds up to it. "
          "Rejected attempts (kept under <code>refs/attempts/</code>) are red crosses; dashed lines are the "
          "guard each step had to stay under.</p>")
    hist = [c for c in cs if c.status == "history"]
    order = {c.id: k for k, c in enumerate(c for c in rep.commits if c.status == "history")}
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[order[c.id] for c in hist], y=[c.metric for c in hist], mode="lines",
                             line={"color": "#bbb"}, showlegend=False, hoverinfo="skip"))
    for op in sorted({(c.op or {}).get("op") for c in hist}, key=str):
        sel = [c for c in hist if (c.op or {}).get("op") == op]
        fig.add_trace(go.Scatter(
            x=[order[c.id] for c in sel], y=[c.metric for c in sel], mode="markers+text", name=_t(op or "commit"),
            text=[_t(op or "") for c in sel], textposition="top center",
            marker={"size": 11, "color": OP_COLORS.get(op, "#444")},
            hovertext=[_t(f"{c.id[:12]} {(c.message.splitlines() or [''])[0][:60]}") for c in sel],
            hoverinfo="text+y"))
    att = [c for c in cs if c.status == "attempt"]
    if att:
        fig.add_trace(go.Scatter(
            x=[order.get(c.parents[0], 0) + 0.5 for c in att], y=[c.metric for c in att], mode="markers",
            name="rejected attempt", marker={"symbol": "x", "size": 13, "color": "#d00"},
            hovertext=[_t(f"{c.id[:12]} {c.ref}") for c in att], hoverinfo="text+y"))
    for step in _guards(rep):
        fig.add_trace(go.Scatter(x=step["x"], y=[step["limit"]] * 2, mode="lines", name=_t(f"guard ({step['op']})"),
                                 line={"dash": "dash", "color": OP_COLORS.get(step["op"], "#444")},
                                 hoverinfo="name+y"))
    fig.update_xaxes(title="commit (oldest first)", tickvals=list(order.values()),
                     ticktext=[k[:8] for k in order])
    fig.update_yaxes(title=metric)
    rows = [[f"<a href='#c-{c.id}'><code>{c.id[:12]}</code></a>", _e((c.op or {}).get("op") or "commit"),
             _e(c.status), _num(c.metric), _human(c.weights_bytes), _human(c.store.get("stored"))] for c in cs]
    table = _table(["commit", "op", "status", metric, "weights", "store added"], rows, f"{metric} per commit")
    p.chart("timeline", fig, f"{metric} along the history", table)
    fig = go.Figure()
    for c in cs:
        op = (c.op or {}).get("op")
        fig.add_trace(go.Scatter(
            x=[c.weights_bytes / 2**20], y=[c.metric], mode="markers+text", text=[_t(op or "base")],
            textposition="top center", showlegend=False,
            marker={"size": 12, "symbol": "x" if c.status == "attempt" else "circle",
                    "color": "#d00" if c.status == "attempt" else OP_COLORS.get(op, "#444")},
            hovertext=[_label(c)], hoverinfo="text+x+y"))
    fig.update_xaxes(title="weights (MiB)")
    fig.update_yaxes(title=metric)
    p.chart("timeline", fig, f"{metric} against model size", "")
    total, xs = 0, []
    for c in rep.commits:
        if c.status == "history":
            total += c.store.get("stored", 0)
        xs.append(total + (c.store.get("stored", 0) if c.status == "attempt" else 0))
    fig = go.Figure()
    for c, x in zip(rep.commits, xs):
        if c.metric is None:
            continue
        op = (c.op or {}).get("op")
        fig.add_trace(go.Scatter(
            x=[x / 2**20], y=[c.metric], mode="markers+text", text=[_t(op or "base")], textposition="top center",
            showlegend=False, hovertext=[_label(c)], hoverinfo="text+x+y",
            marker={"size": 12, "symbol": "x" if c.status == "attempt" else "circle",
                    "color": "#d00" if c.status == "attempt" else OP_COLORS.get(op, "#444")}))
    fig.update_xaxes(title="store bytes up to the commit (MiB)")
    fig.update_yaxes(title=metric)
    p.chart("timeline", fig, f"{metric} against store bytes", "")


def _guards(rep: Report) -> list[dict]:
    """Per step with a recorded guard: the metric it had to stay under, over the step's commits."""
    order = {c.id: k for k, c in enumerate(c for c in rep.commits if c.status == "history")}
    out = []
    for c in rep.commits:
        op = c.op or {}
        g = op.get("guard") or {}
        before = ((op.get("metrics") or {}).get("before") or {}).get(rep.metric)
        wave = (op.get("params") or {}).get("wave")
        if not isinstance(g.get("max_drop"), int | float) or not isinstance(before, int | float):
            continue
        if isinstance(wave, list) and wave and wave[0] != 1:
            continue  # one line per step, from its first wave (whose "before" is the step's start)
        start = order.get(c.parents[0]) if c.parents else None
        if start is None or rep.metric != "ppl":
            continue
        n = wave[1] if isinstance(wave, list) and len(wave) == 2 else 1
        out.append({"op": op.get("op"), "limit": before * (1 + g["max_drop"]), "x": [start, start + n]})
    return out


def _heat(p: _Page, section: str, g: dict, title: str, zmin=None, zmax=None, text=None, colorscale="Viridis"):
    go = p.go
    if not g.get("layers") or all(v is None for row in g["values"] for v in row):
        return
    z = [[v for v in row] for row in g["values"]]
    fig = go.Figure(go.Heatmap(
        z=z, x=g["roles"], y=[f"layer {li}" for li in g["layers"]], zmin=zmin, zmax=zmax, colorscale=colorscale,
        text=text, texttemplate="%{text}" if text else None, hoverongaps=False,
        hovertemplate="%{y} %{x}: %{z}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(height=max(260, 60 + 28 * len(g["layers"])))
    rows = [[f"layer {li}"] + [_num(v) for v in row] for li, row in zip(g["layers"], g["values"])]
    p.chart(section, fig, title, _table(["layer", *g["roles"]], rows, title))


def _layers(p: _Page, layers: dict) -> None:
    rng = layers.get("range") or {}
    if not rng.get("bits", {}).get("layers"):
        return
    at, sp, frm, to = (layers.get(k) for k in ("at", "sparsity_at", "from", "to"))
    p.add("<h2 id=layers>Per-layer heatmaps</h2><p>Decoder matrices by layer and role.</p>")
    methods = rng.get("method", {}).get("values") or []
    _heat(p, "layers", rng["bits"], f"bits per stored element at {at[:12]} (text: the method)", 0, 32,
          text=methods, colorscale="Blues")
    _heat(p, "layers", rng["sparsity"], f"sparsity (fraction of zero elements) at {sp[:12]}"
          + (" (values at the head are packed)" if sp != at else ""), 0, 1)
    if frm and "changed" in rng:
        what = f"{frm[:12]} → {to[:12]}"
        _heat(p, "layers", rng["changed"], f"fraction of elements changed, {what} (text: how else it changed)", 0, 1,
              text=rng.get("note", {}).get("values"), colorscale="Reds")
        _heat(p, "layers", rng["rel_l2"], f"relative L2 of the change, {what} (blank: reshaped)", 0, None,
              text=rng.get("note", {}).get("values"), colorscale="Magma")
    steps = layers.get("steps") or {}
    if steps.get("rows") and steps.get("columns"):
        go = p.go
        labels = [_t(r["label"]) for r in steps["rows"]]
        for key, title, zmax, scale in (
                ("changed", "which matrices each step changed (fraction of elements)", 1, "Reds"),
                ("rel_l2", "relative L2 of each step's change (blank: reshaped or re-encoded)", None, "Magma")):
            if all(v is None for row in steps[key] for v in row):
                continue
            fig = go.Figure(go.Heatmap(
                z=steps[key], x=steps["columns"], y=labels, zmin=0, zmax=zmax, colorscale=scale, hoverongaps=False,
                hovertemplate="%{y}<br>%{x}: %{z:.4g}<extra></extra>"))
            fig.update_yaxes(autorange="reversed")
            fig.update_layout(height=max(280, 80 + 26 * len(labels)))
            rows = [[lab] + [_num(v) for v in vals] for lab, vals in zip(labels, steps[key])]
            p.chart("layers", fig, title, _table(["step", *steps["columns"]], rows, title))  # labels escaped


def _importance(p: _Page, scores: dict | None, clusters: dict | None) -> None:
    if not (scores and scores.get("layers")) and not clusters:
        return
    p.add("<h2 id=importance>Importance</h2>")
    if scores and scores.get("layers"):
        _scores(p, scores)
    if clusters:
        _clusters(p, clusters)


def _clusters(p: _Page, cl: dict) -> None:
    go = p.go
    ms = cl["matrices"]
    p.add(f"<p>The clusters of the cluster-adaptive prune <a href='#c-{cl['commit']}'><code>{cl['commit'][:12]}"
          "</code></a>: per matrix, its rows grouped by their score statistics (k-means), each group pruned "
          "with its own threshold. A point is a cluster: its mean score, its size (rows) and the largest "
          "score it pruned.</p>")
    labels = [f"{m['layer']}.{m['role']}" for m in ms]
    fig = go.Figure()
    for k in range(cl["k"]):
        sel = [(lab, m) for lab, m in zip(labels, ms) if k < len(m["rows"])]
        fig.add_trace(go.Scatter(
            x=[lab for lab, _ in sel], y=[m["mean_score"][k] for _, m in sel], mode="markers",
            name=f"cluster {k + 1} (by mean score)",
            marker={"size": [6 + 24 * m["rows"][k] / max(1, sum(m["rows"])) for _, m in sel]},
            customdata=[[m["rows"][k], m["threshold"][k]] for _, m in sel],
            hovertemplate="%{x}: mean score %{y:.4g}<br>%{customdata[0]} rows, pruned below %{customdata[1]:.4g}"
                          "<extra></extra>"))
    fig.update_xaxes(title="matrix (layer.role)")
    fig.update_yaxes(title="mean score", type="log" if all(
        (v or 0) > 0 for m in ms for v in m["mean_score"]) else "linear")
    rows = [[_e(m["name"])] + [f"{r} rows, mean {_num(s)}, cut {_num(t)}" for r, s, t in
                               zip(m["rows"], m["mean_score"], m["threshold"])] for m in ms]
    title = "clusters of cluster-adaptive pruning"
    p.chart("importance", fig, title, _table(["matrix", *[f"cluster {k + 1}" for k in range(cl["k"])]], rows, title))


def _scores(p: _Page, scores: dict) -> None:
    go = p.go
    p.add(f"<p>{_e(scores['method'])} scores"
          + (f" of <code>{_e(scores['rev'][:12])}</code>" if scores.get("rev") else "")
          + " (<code>mvc compress score -o FILE.json</code>), per layer.</p>")
    for kind in ("neurons", "heads"):
        if not any(r[kind] for r in scores["layers"]):
            continue
        fig = go.Figure()
        for r in scores["layers"]:
            if r[kind]:
                fig.add_trace(go.Box(y=r[kind], name=f"layer {r['layer']}", boxpoints="outliers"))
        fig.update_layout(showlegend=False)
        positive = all(v > 0 for r in scores["layers"] for v in r[kind])
        fig.update_yaxes(title="score", type="log" if positive else "linear")
        rows = []
        for r in scores["layers"]:
            v = sorted(r[kind])
            if v:
                rows.append([f"layer {r['layer']}", len(v), _num(v[0]), _num(v[len(v) // 2]), _num(v[-1])])
        p.chart("importance", fig, f"{kind[:-1]} scores per layer",
                _table(["layer", kind, "min", "median", "max"], rows, f"{kind[:-1]} scores"))


def _waves(p: _Page, rep: Report) -> None:
    steps = [s for s in rep.waves if len(s["waves"]) > 1 or any(w["status"] == "attempt" for w in s["waves"])]
    if not steps:
        return
    go = p.go
    p.add("<h2 id=waves>Waves</h2><p>Each wave of a multi-wave step, its metric and its z-score: the log-"
          "increment of the metric against the earlier waves' (a wave whose z-score exceeds the step's "
          "<code>--spike-z</code> stops the step).</p>")
    for s in steps:
        ws = s["waves"]
        label = f"{s['op']} {s['method']} ({len(ws)} of {s['of']} waves)"  # escaped by chart()
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=[0] + [w["wave"] for w in ws], y=[s["before"]] + [w["metric"] for w in ws],
                                 mode="lines+markers", name=rep.metric,
                                 marker={"color": ["#444"] + ["#d00" if w["status"] == "attempt" else "#1f77b4"
                                                              for w in ws], "size": 10}))
        fig.add_trace(go.Bar(x=[w["wave"] for w in ws], y=[w["z"] for w in ws], name="z-score", yaxis="y2",
                             opacity=0.35, marker={"color": "#ff7f0e"}))
        if s.get("spike_z"):
            fig.add_trace(go.Scatter(x=[0.5, len(ws) + 0.5], y=[s["spike_z"]] * 2, mode="lines", yaxis="y2",
                                     name=f"spike rule z > {s['spike_z']:g}", line={"dash": "dot", "color": "#ff7f0e"}))
        if s.get("max_drop") is not None and s["before"] and rep.metric == "ppl":
            fig.add_trace(go.Scatter(x=[0, len(ws)], y=[s["before"] * (1 + s["max_drop"])] * 2, mode="lines",
                                     name=f"guard (+{s['max_drop']:.0%})", line={"dash": "dash", "color": "#d00"}))
        fig.update_layout(xaxis={"title": "wave", "dtick": 1}, yaxis={"title": rep.metric},
                          yaxis2={"title": "z-score", "overlaying": "y", "side": "right", "showgrid": False})
        rows = [[w["wave"], f"<a href='#c-{w['commit']}'><code>{w['commit'][:12]}</code></a>", _e(w["status"]),
                 _num(w["strength"]), _num(w["metric"]), _num(w["drop"]), _num(w["z"])] for w in ws]
        p.chart("waves", fig, label, _table(["wave", "commit", "status", "strength", rep.metric, "drop", "z"],
                                            rows, label))


def _storage(p: _Page, rep: Report) -> None:
    st = rep.storage
    if not st.get("commits"):
        return
    go = p.go
    store = st.get("store") or {}
    p.add(f"<h2 id=storage>Storage</h2><p>The store holds {store.get('objects', 0):,} objects in "
          f"{_human(store.get('stored_bytes', 0))}. Per commit: what it added, what compression and delta "
          "coding saved on its new chunks, and what deduplication saved (its tensors already stored).</p>")
    labels = [_label(c) for c in rep.commits]
    stored = [r["stored"] for r in st["commits"]]
    coded = [max(0, r["raw_new"] - r["stored"]) for r in st["commits"]]
    dedup = [max(0, r["tree_raw"] - r["raw_new"]) for r in st["commits"]]
    fig = go.Figure()
    for name, vals, color in (("stored", stored, "#1f77b4"), ("saved by compression and delta", coded, "#2ca02c"),
                              ("saved by dedup", dedup, "#c7c7c7")):
        fig.add_trace(go.Bar(x=labels, y=[v / 2**20 for v in vals], name=name, marker={"color": color}))
    fig.update_layout(barmode="stack")
    fig.update_yaxes(title="MiB")
    rows = [[f"<a href='#c-{r['commit']}'><code>{r['commit'][:12]}</code></a>", _human(r["stored"]),
             _human(r["raw_new"]), _human(r["tree_raw"]),
             _e(", ".join(f"{k} {v}" for k, v in sorted(r["encodings"].items())))] for r in st["commits"]]
    p.chart("storage", fig, "bytes per commit", _table(
        ["commit", "stored", "new chunks (raw)", "files (raw)", "chunk encodings"], rows, "bytes per commit"))
    ts = st.get("tensors") or []
    if ts:
        fig = go.Figure()
        names = [_t(t["name"]) for t in ts]
        fig.add_trace(go.Bar(y=names, x=[t["raw"] / 2**10 for t in ts], orientation="h", name="raw",
                             marker={"color": "#c7c7c7"}))
        fig.add_trace(go.Bar(y=names, x=[t["stored"] / 2**10 for t in ts], orientation="h", name="stored",
                             marker={"color": "#1f77b4"}))
        fig.update_layout(barmode="overlay", height=max(300, 60 + 18 * len(ts)))
        fig.update_xaxes(title="KiB")
        fig.update_yaxes(autorange="reversed")
        rows = [[_e(t["name"]), _e(t["dtype"]), _human(t["raw"]), _human(t["stored"]),
                 _num(t["stored"] / t["raw"] if t["raw"] else None, 3)] for t in ts]
        title = f"bytes per tensor at the head (largest {len(ts)} of {st['tensor_count']})"
        p.chart("storage", fig, title, _table(["tensor", "dtype", "raw", "stored", "stored/raw"], rows, title))


def _commits(p: _Page, rep: Report) -> None:
    p.add(f"<h2 id=commits>Commits</h2><table><thead><tr><th scope=col>commit</th><th scope=col>date</th>"
          f"<th scope=col>message</th><th scope=col>op</th><th scope=col>{_e(rep.metric)}</th>"
          "<th scope=col>weights</th><th scope=col>store added</th><th scope=col>op record</th></tr></thead><tbody>")
    for c in reversed(rep.commits):
        op = c.op or {}
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(c.time))
        cls = " class=attempt" if c.status == "attempt" else ""
        tag = " (HEAD)" if c.id == rep.head else (f" ({_e(c.ref)}, rejected)" if c.ref else "")
        record = (f"<details><summary>record</summary><pre>{_e(json.dumps(op, indent=1, sort_keys=True))}</pre>"
                  "</details>") if op else ""
        p.add(f"<tr id='c-{c.id}'{cls}><td><code title='{c.id}'>{c.id[:12]}</code>{tag}</td><td>{when}</td>"
              f"<td>{_e(c.message.splitlines()[0] if c.message else '')}</td>"
              f"<td>{_e(op.get('op', ''))} {_e(op.get('method', ''))}</td><td>{_num(c.metric)}</td>"
              f"<td>{_human(c.weights_bytes)}</td><td>{_human(c.store.get('stored'))}</td><td>{record}</td></tr>")
    p.add("</tbody></table>")


def render(rep: Report, title: str = "mvc report") -> str:
    p = _Page()
    head = rep.head or "?"
    p.add(f"<h1>{_e(title)}</h1><p class=muted>{len([c for c in rep.commits if c.status == 'history'])} commits "
          f"of <code>{_e(rep.range)}</code>, head <code id=head>{_e(head)}</code>; made by mvc on "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.</p>")
    p.add("<nav>" + "".join(f"<a href='#{k}'>{v}</a>" for k, v in (
        ("timeline", "Timeline"), ("layers", "Layers"), ("importance", "Importance"), ("waves", "Waves"),
        ("storage", "Storage"), ("commits", "Commits"))) + "</nav>")
    _timeline(p, rep)
    _layers(p, rep.layers)
    _importance(p, rep.scores, rep.clusters)
    _waves(p, rep)
    _storage(p, rep)
    _commits(p, rep)
    return p.html(title)


def render_diff(d: dict) -> str:
    """The heatmaps of one change (mvc diff A B --html)."""
    p = _Page()
    p.add(f"<h1>mvc diff</h1><p class=muted><code>{_e(d['from'][:12])}</code> → <code>{_e(d['to'][:12])}</code></p>")
    _layers(p, d)
    if not d["range"].get("bits", {}).get("layers"):
        p.add("<p>Neither revision holds decoder matrices mvc recognises (layers.N.… with q/k/v/o, gate/up/"
              "down or their GPT-2 and BERT names).</p>")
    return p.html(f"mvc diff {d['from'][:12]} {d['to'][:12]}")
