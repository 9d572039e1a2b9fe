"""A self-contained ``report.html`` for a :class:`~.suite.SuiteReport` (given as its dict): every picture and plot embedded as a
``data:`` URL, nothing fetched.

Per task: the main metrics (one row per model), its plot, the per-category tables side by side, then the first
``html_max_items`` dialogues or items turn by turn — the user turn with its pictures, the reference reply, and for
each model beside the others its reply, whether it succeeded, what was extracted or judged, and the judge's reason
(or why there is no verdict, with the raw answer). A small script marks ``<body data-images-loaded="k/n">`` once the
page has loaded (``k`` pictures decoded out of ``n``), which the tests read back from headless Chromium.

Example:
    >>> Path("runs/eval/report.html").write_text(render_html(report.to_dict(), Path("runs/eval")))  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chatumm_kit.eval.tasks import MAIN_METRICS

__all__ = ["render_html"]

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; background: #fff; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; font-size: 13px; }
th { background: #eef2f7; }
td.ok { background: #e8f6e8; } td.bad { background: #fbeaea; }
img.turn { width: 96px; height: 96px; image-rendering: pixelated; border: 1px solid #999; display: block;
           margin: 2px 0; }
img.plot { max-width: 100%; }
.reason { color: #555; font-style: italic; } .error { color: #a00; } .meta { color: #666; font-size: 12px; }
.cats { display: flex; gap: 1.5em; flex-wrap: wrap; }
td div { white-space: pre-wrap; }
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } }
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
});
"""


class _Embedder:
    """``data:`` URLs of the report's picture files, read once each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._urls: dict[str, str] = {}

    def url(self, rel: str) -> str:
        if rel not in self._urls:
            data = (self.root / rel).read_bytes()
            self._urls[rel] = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return self._urls[rel]


_CONTROL = dict.fromkeys([*range(0, 9), 11, 12, *range(14, 32), 127], "\ufffd")


def _e(value: Any) -> str:
    """Escaped text; control characters (a model's stray bytes) shown as U+FFFD."""
    return html.escape(str(value).translate(_CONTROL))


def _num(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    return f"{v:.3f}" if isinstance(v, float) else _e(v)


def _parts(parts: list[dict[str, str]], embed: _Embedder) -> str:
    out = []
    for p in parts:
        if "image" in p:
            out.append(f'<img class="turn" alt="{_e(p["image"])}" src="{embed.url(p["image"])}">')
        else:
            out.append(f"<div>{_e(p['text'])}</div>")
    return "".join(out) or '<span class="meta">(empty)</span>'


def _verdict(score: dict[str, Any]) -> str:
    lines = [f"<b>{'success' if score['success'] else 'failure'}</b> · intent {score['predicted_output']}"
             f"{'' if score['intent'] else ' (expected ' + _e(score['expected_output']) + ')'}"]  # fmt: skip
    if score.get("extracted") is not None:
        lines.append(f"answer read: <b>{_e(score['extracted'])}</b>")
    elif score.get("text_metric") == "answer":
        lines.append('<span class="error">no answer could be read</span>')
    if score.get("detected"):
        lines.append(f"detected: {_e(score['detected'])}")
    v = score.get("verdict")
    if v:
        if v.get("scores") is not None:
            lines.append("judge: " + ", ".join(f"{_e(k)} {_e(x)}" for k, x in v["scores"].items()))
            lines.append(f'<span class="reason">{_e(v.get("reason") or "")}</span>')
        else:
            lines.append(f'<span class="error">no verdict: {_e(v.get("error"))}</span>')
            if v.get("raw"):
                lines.append(f'<span class="meta">judge said: {_e(str(v["raw"])[:300])}</span>')
    elif score.get("judged"):
        lines.append("judged: " + ", ".join(f"{_e(k)} {_num(x)}" for k, x in score["judged"].items()))
    return "<br>".join(lines)


def _metrics_table(results: dict[str, Any], first: tuple[str, ...]) -> str:
    keys: list[str] = [k for k in first if any(k in r["metrics"] for r in results.values())]
    for r in results.values():
        keys += [k for k in r["metrics"] if k not in keys]
    head = "".join(f"<th>{_e(k)}</th>" for k in keys)
    rows = "".join(
        f"<tr><th>{_e(m)}</th>" + "".join(f"<td>{_num(r['metrics'].get(k))}</td>" for k in keys) + "</tr>"
        for m, r in results.items()
    )
    return f"<table><tr><th>model</th>{head}</tr>{rows}</table>"


def _category_tables(results: dict[str, Any]) -> str:
    blocks = []
    for model, r in results.items():
        cats = r["categories"]
        if not cats:
            continue
        keys: list[str] = []
        for v in cats.values():
            keys += [k for k in v if k not in keys]
        head = "".join(f"<th>{_e(k)}</th>" for k in keys)
        rows = "".join(
            f"<tr><th>{_e(c)}</th>" + "".join(f"<td>{_num(v.get(k))}</td>" for k in keys) + "</tr>"
            for c, v in cats.items()
        )
        blocks.append(f"<div><h4>{_e(model)}: by category</h4><table><tr><th>category</th>{head}</tr>{rows}</table>"
                      "</div>")  # fmt: skip
    return f'<div class="cats">{"".join(blocks)}</div>' if blocks else ""


def _breakdowns(results: dict[str, Any]) -> str:
    """Multi-turn tasks: teacher-forced means by history distance and by turn index, models side by side."""
    blocks = []
    for key, label in (("by_distance", "history distance"), ("by_turn", "turn index")):
        per_model = {m: r["extra"].get("teacher_forced", {}).get(key) for m, r in results.items()}
        if not any(per_model.values()):
            continue
        buckets: list[str] = []
        for b in per_model.values():
            buckets += [k for k in b or {} if k not in buckets]
        metrics = ("intent", "success", "reply_quality")
        head = "".join(f"<th>{_e(m)}: {x}</th>" for m in per_model for x in (*metrics, "turns"))
        rows = []
        for k in buckets:
            cells = []
            for b in per_model.values():
                stats = (b or {}).get(k, {})
                cells += [f"<td>{_num(stats.get(x, {}).get('mean'))}</td>" for x in metrics]
                cells.append(f"<td>{_num(stats.get('intent', {}).get('count'))}</td>")
            rows.append(f"<tr><th>{_e(k)}</th>{''.join(cells)}</tr>")
        blocks.append(f"<div><h4>by {label} (teacher-forced)</h4><table><tr><th>{label}</th>{head}</tr>"
                      f"{''.join(rows)}</table></div>")  # fmt: skip
    return f'<div class="cats">{"".join(blocks)}</div>' if blocks else ""


def _dialogues(results: dict[str, Any], limit: int, embed: _Embedder) -> str:
    models = list(results)
    by_model: dict[str, dict[tuple[str, int], dict]] = {
        m: {(t["dialogue_id"], t["index"]): t for t in r["turns"]} for m, r in results.items()
    }
    free = {m: {f["dialogue_id"]: f for f in r.get("free_runs", [])} for m, r in results.items()}
    order: list[str] = []
    for t in results[models[0]]["turns"]:
        if t["dialogue_id"] not in order:
            order.append(t["dialogue_id"])
    out = []
    for did in order[:limit]:
        turns = sorted((k for k in by_model[models[0]] if k[0] == did), key=lambda k: k[1])
        head = "".join(f"<th>{_e(m)}</th>" for m in models)
        notes = [f"{_e(m)}: first failure (free-running) at turn {_e(free[m][did]['first_failure'])}"
                 for m in models if did in free[m]]  # fmt: skip
        rows = []
        for key in turns:
            first = by_model[models[0]][key]
            cells = []
            for m in models:
                t = by_model[m].get(key)
                if t is None:
                    cells.append("<td>-</td>")
                    continue
                cls = "ok" if t["score"]["success"] else "bad"
                cells.append(f'<td class="{cls}">{_parts(t["reply"], embed)}<div class="meta">'
                             f"{_verdict(t['score'])}</div></td>")  # fmt: skip
            cat = f'<div class="meta">{_e(first["category"])}</div>' if first.get("category") else ""
            rows.append(f"<tr><td>{key[1]}{cat}</td><td>{_parts(first['user'], embed)}</td>"
                        f"<td>{_parts(first['reference'], embed)}</td>{''.join(cells)}</tr>")  # fmt: skip
        note = f'<div class="meta">{"; ".join(notes)}</div>' if notes else ""
        out.append(f"<h4>{_e(did)}</h4>{note}<table><tr><th>turn</th><th>user</th><th>reference</th>{head}</tr>"
                   f"{''.join(rows)}</table>")  # fmt: skip
    more = len(order) - limit
    if more > 0:
        out.append(f'<p class="meta">{more} more (all are in report.json)</p>')
    return "".join(out)


def render_html(report: Mapping[str, Any], root: Path) -> str:
    """The page (module docstring) of a report as ``SuiteReport.to_dict()`` gives it; pictures are read from ``root``
    (the report's folder)."""
    embed = _Embedder(Path(root))
    limit = int(report["settings"].get("html_max_items", 20))
    body = ["<h1>chatumm_kit evaluation</h1>",
            f'<p class="meta">models: {_e(", ".join(report["models"]))}; judge: '
            f"{_e(json.dumps(report['judge']) if report['judge'] else 'none')}</p>"]  # fmt: skip
    for name, task in report["tasks"].items():
        results = task["results"]
        body.append(f"<h2 id='{_e(name)}'>{_e(name)} <span class='meta'>({_e(task['kind'])})</span></h2>")
        body.append(_metrics_table(results, MAIN_METRICS.get(task["kind"], ())))
        plot = Path(root) / "plots" / f"{name}.png"
        if plot.is_file():
            body.append(f'<img class="plot" alt="plot {_e(name)}" src="{embed.url(f"plots/{name}.png")}">')
        body.append(_category_tables(results))
        body.append(_breakdowns(results))
        body.append(_dialogues(results, limit, embed))
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>chatumm_kit evaluation</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(body)}<script>{_SCRIPT}</script></body></html>")  # fmt: skip
