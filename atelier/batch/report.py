"""The batch report: ``report.csv`` (one line per row) and ``report.html`` (the same with thumbnails)."""
from __future__ import annotations

import csv
import html
import json
from pathlib import Path

THUMB = 128
COLUMNS = ("id", "state", "outputs", "error", "server", "attempts", "seconds")


def _thumb(out: Path, name: str) -> str:
    """A small JPEG beside the outputs (``.thumbs/``); '' if the output is not a picture PIL reads."""
    try:
        from PIL import Image
    except ImportError:
        return ""
    src, dst = out / name, out / ".thumbs" / (Path(name).stem + ".jpg")
    try:
        if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
            dst.parent.mkdir(exist_ok=True)
            with Image.open(src) as im:
                im.thumbnail((THUMB, THUMB))
                im.convert("RGB").save(dst, "JPEG", quality=80)
        return str(dst.relative_to(out))
    except (OSError, ValueError):
        return ""


def write_reports(manifest, out) -> dict:
    out = Path(out)
    rows = manifest.items()
    extra = sorted({k for r in rows for k in json.loads(r["row"] or "{}") if k != "id"})
    csv_path, html_path = out / "report.csv", out / "report.html"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([*COLUMNS, *extra])
        for r in rows:
            row = json.loads(r["row"] or "{}")
            w.writerow([r["id"], r["state"], " ".join(json.loads(r["outputs"])), r["error"] or "", r["server"] or "",
                        r["attempts"], f"{r['seconds']:.2f}" if r["seconds"] else "",
                        *[row.get(k, "") for k in extra]])
    counts = manifest.counts()
    e = html.escape
    body = []
    for r in rows:
        outs = json.loads(r["outputs"])
        thumbs = "".join(f'<a href="{e(o)}"><img src="{e(t)}" alt="{e(o)}"></a>' if (t := _thumb(out, o)) else
                         f'<a href="{e(o)}">{e(o)}</a>' for o in outs)
        body.append(f'<tr class="{e(r["state"])}"><td>{e(r["id"])}</td><td>{e(r["state"])}</td><td>{thumbs}</td>'
                    f'<td>{e(r["error"] or "")}</td><td>{e(r["server"] or "")}</td><td>{r["attempts"]}</td></tr>')
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    html_path.write_text(
        "<!doctype html><meta charset=utf-8><title>Atelier batch report</title><style>"
        "body{font:14px sans-serif}td{border-bottom:1px solid #ddd;padding:4px;vertical-align:top}"
        "img{max-width:128px;max-height:128px;margin-right:4px}.failed td{background:#fee}.skipped td{color:#888}"
        f"</style><h1>Batch report</h1><p>{e(summary)}</p><table><tr><th>id</th><th>state</th><th>outputs</th>"
        "<th>error</th><th>server</th><th>attempts</th></tr>" + "".join(body) + "</table>", encoding="utf-8")
    return {"csv": str(csv_path), "html": str(html_path)}
