"""The data check's page (data_check.html): its findings, and each duplicate pair side by side as inline thumbnails.
Self-contained: the pictures are data: URIs, the style inline, no script; it opens offline in any browser."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from pathlib import Path

import PIL.Image

SHOWN = 200  # duplicate groups shown as pictures (the JSON lists them all)
SIDE = 96  # thumbnail side in pixels

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
.error{color:#b00020}.warning{color:#a15c00}.info{color:#555}
.pair{display:flex;gap:1em;align-items:flex-start;margin:.8em 0;padding:.5em;border-bottom:1px solid #eee}
figure{margin:0;text-align:center;font-size:.8em}img{image-rendering:pixelated;border:1px solid #999}"""


def write_page(report: dict, path: str | Path, picture: Callable[[dict], PIL.Image.Image | None]) -> Path:
    """`report`: data_check.json's content; `picture(image)`: the image a finding names, or None."""
    leaks = report["leaks"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Data check</title><style>{_STYLE}</style>"
             "</head><body><h1>Data check</h1>",
             f"<p><b>Leaks</b> (evaluation images already in an earlier split): <b>{leaks['exact']}</b> exact, "
             f"<b>{leaks['near']}</b> near.</p>", _splits_table(report["splits"]), "<h2>Findings</h2><ul>"]
    for finding in report["findings"]:
        if finding["check"] not in ("exact_duplicate", "near_duplicate"):
            parts.append(f"<li class='{finding['severity']}'>{finding['check']}: {html.escape(finding['message'])}"
                         "</li>")
    parts.append("</ul><h2>Duplicates</h2>")
    pairs = [f for f in report["findings"] if f["check"] in ("exact_duplicate", "near_duplicate")]
    if not pairs:
        parts.append("<p>No duplicate images.</p>")
    for finding in pairs[:SHOWN]:
        figures = "".join(_figure(image, picture(image)) for image in finding["images"][:6])
        parts.append(f"<div class='pair'>{figures}<p class='{finding['severity']}'>{finding['check']}: "
                     f"{html.escape(finding['message'])}</p></div>")
    if len(pairs) > SHOWN:
        parts.append(f"<p>{len(pairs) - SHOWN} more in data_check.json.</p>")
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts))
    return path


def _splits_table(splits: dict) -> str:
    names = list(dict.fromkeys(name for split in splits.values() for name in split["classes"]))
    head = "".join(f"<th>{html.escape(s)} ({v['images']})</th>" for s, v in splits.items())
    rows = "".join(f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{v['classes'].get(n, 0)}</td>"
                                                               for v in splits.values()) + "</tr>" for n in names)
    return f"<h2>Images per class</h2><table><tr><th>class</th>{head}</tr>{rows}</table>"


def _figure(image: dict, picture: PIL.Image.Image | None) -> str:
    caption = html.escape(f"{image['split']} row {image['row']}" + (f" {Path(image['file']).name}"
                                                                     if image.get("file") else ""))
    if picture is None:
        return f"<figure>(not readable)<figcaption>{caption}</figcaption></figure>"
    thumb = picture.convert("RGB")
    scale = SIDE / max(thumb.size)
    thumb = thumb.resize((max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))),
                         PIL.Image.NEAREST if scale > 1 else PIL.Image.BILINEAR)
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    return (f"<figure><img src='data:image/png;base64,{data}' width='{thumb.width}' height='{thumb.height}' "
            f"alt='{caption}'><figcaption>{caption}<br>{picture.width}x{picture.height}</figcaption></figure>")
