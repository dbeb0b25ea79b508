"""``report.html``: the HTML report of an output folder, one self-contained, offline page.

``report.html`` needs no network and no script: inline CSS, no JavaScript, no
``http(s)://`` or protocol-relative (``//``) address anywhere; the pictures are referenced
by relative path (``qc/*.png`` in the same output folder), so the page stays small and
opens from a USB stick or a PACS export as well as from the folder. Every string that
comes from the study, the bundle or the options is HTML-escaped (DICOM descriptions and
file names can hold anything).

Sections: study summary; measures (native vs high resolution, and for a motion
adaptation the source's and the target's), with a warning box above the table listing
every plausibility flag (``Result.plausibility``) and the flagged cells marked; volume
curves; per-slice overlays; the
model-grid reconstructions; long-axis-like cuts; inversion summary; timings; warnings;
run (backend, device, options, bundle: name, manifest SHA-256, preset, creation and the
provenance its manifest records; versions); files. The header names the bundle too.

The screenshot ``docs/report.png`` is the report of a real run: a demonstration model of
the ``tiny`` preset trained on four phantoms (seeds 0-3; gan, encoder and seg 1500 steps at
batch 16, latents 30 steps), exported, and a held-out phantom (seed 7) reconstructed with
``--steps 20 --interp 4``; then, with Chromium 156 (Debian's ``chromium`` package)::

    chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \\
        --screenshot=docs/report.png --window-size=1280,2000 file:///tmp/demo2/recon/report.html
    .venv/bin/python -c "from PIL import Image; im = Image.open('docs/report.png').convert('RGB'); \\
    im.quantize(colors=128, method=Image.Quantize.FASTOCTREE).save('docs/report.png', optimize=True)"
"""
from __future__ import annotations

import html
import json
import math
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import quote

from ..bundle import validation_summary
from ..errors import UsageError
from ..measures import MEASURE_COLUMNS, PLAUSIBLE_RANGES
from ..result import MOTION_KIND, Result, all_warnings, frame_ids
from .run_report import inversion_summary
from .run_report import run_report as build_run_report
from .run_report import study_summary

REPORT_NAME = "report.html"
#: plausibility flags listed in the report's warning box (the rest are counted)
MAX_FLAGS_LISTED = 24

#: the pictures the report knows, in page order: key -> (section title, caption)
PICTURES: dict[str, tuple[str, str]] = {
    "volume_curves": ("Volume curves",
                      "LV and RV cavity volume over the reconstructed phases, from the native "
                      "segmentation and from the high-resolution volume; ED (upward triangle) "
                      "and ES (downward triangle) marked."),
    "volume_curves_motion": ("Motion adaptation",
                             "LV and RV cavity volume over the cardiac cycle: the source "
                             "subject, the target whose motion is transferred, and the "
                             "adapted sequence."),
    "overlay_native": ("Segmentation overlays",
                       "Native slices at ED and ES with the segmentation's contours: LV "
                       "cavity vermillion, LV myocardium green, RV cavity blue."),
    "recon_model": ("Reconstructions on the model grid",
                    "The preprocessed input x and its reconstruction G(w*) from the "
                    "optimised latent code, both with the contours of Seg(G(w*))."),
    "long_axis": ("Long-axis-like cuts",
                  "Cuts along the slice normal through the LV centre: the input stack (thick "
                  "slices shown as slabs) and the high-resolution volume, at the physical "
                  "aspect ratio."),
}

_CSS = """
:root { --fg: #1b1f24; --muted: #59636e; --line: #d0d7de; --bg2: #f6f8fa; --accent: #0072B2; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); margin: 0 auto; max-width: 1240px; padding: 16px 20px 40px; }
header { border-bottom: 2px solid var(--accent); margin-bottom: 10px; }
h1 { font-size: 22px; margin: 4px 0; }
h2 { font-size: 17px; margin: 22px 0 8px; border-bottom: 1px solid var(--line); }
.sub { color: var(--muted); margin: 2px 0 8px; }
nav { font-size: 13px; margin: 6px 0 4px; }
nav a { color: var(--accent); margin-right: 12px; text-decoration: none; }
table { border-collapse: collapse; margin: 4px 0 8px; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: var(--bg2); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.grid { display: flex; flex-wrap: wrap; gap: 8px 28px; align-items: flex-start; }
figure { margin: 6px 0 12px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 12.5px; max-width: 900px; }
.bar { display: inline-block; height: 9px; background: var(--accent); vertical-align: middle; }
.warn { color: #8a4b00; }
.alert { border: 2px solid #b35900; background: #fff4e0; color: #5c2e00; padding: 8px 14px;
         margin: 6px 0 10px; border-radius: 4px; max-width: 900px; }
.alert strong { font-size: 15px; }
.alert ul { margin: 4px 0; padding-left: 20px; }
.ok { color: var(--muted); font-size: 12.5px; }
td.flag { background: #ffe1b3; color: #5c2e00; font-weight: 600; }
code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px;
              word-break: break-all; }
pre { font-size: 11.5px; max-height: 320px; overflow: auto; background: var(--bg2);
      padding: 4px 6px; margin: 4px 0; }
footer { color: var(--muted); font-size: 12px; margin-top: 28px; border-top: 1px solid var(--line); }
@media print { nav { display: none; } figure { break-inside: avoid; } }
"""


def _e(value: Any) -> str:
    """HTML-escaped text of any value (quotes included, for attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "&ndash;"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return _e(value)
    return f"{v:.{digits}f}" if math.isfinite(v) else "&ndash;"


def _kv_table(rows: Iterable[tuple[str, Any]], *, raw: bool = False) -> str:
    """A two-column table; values escaped unless ``raw`` (already HTML)."""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v if raw else _e(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None for anything else."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def _relative_file(folder: Path, rel: str) -> Path:
    """``folder / rel`` after checking ``rel`` is a relative path inside the folder to an
    existing file (the report must never point elsewhere)."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or "://" in rel or rel.startswith("//"):
        raise UsageError(f"report picture {rel!r} must be a relative path inside {folder}")
    full = folder / p
    if not full.is_file():
        raise UsageError(f"report picture {rel!r} does not exist in {folder}")
    return full


def _figure(folder: Path, rel: str, alt: str, caption: str | None = None) -> str:
    size = _png_size(_relative_file(folder, rel))
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{_e(quote(rel))}" alt="{_e(alt)}"{dims}>{cap}</figure>'


def _measure_columns(result: Result) -> list[tuple[str, Mapping[str, Any], list[int]]]:
    """(column title, measures dict, frame ids) of each measures column of the table."""
    titles = {"native": "native", "hr": "high resolution"}
    prefix = "adapted " if result.kind == MOTION_KIND else ""
    ids = frame_ids(result)
    keys = [k for k in ("native", "hr") if k in result.measures]
    keys += [k for k in result.measures if k not in keys]
    cols = [(prefix + titles.get(k, k), result.measures[k], ids) for k in keys]
    if result.kind == MOTION_KIND:
        for name in ("source", "target"):
            other = result.extra.get(name)
            if isinstance(other, Result) and "native" in other.measures:
                cols.append((f"{name} native", other.measures["native"], frame_ids(other)))
    return cols


def _flags_by_column(result: Result) -> list[tuple[str, str, dict[str, Any]]]:
    """(measures column title, whose, flag) of every plausibility flag the report shows:
    the Result's own (whose ""), and for a motion adaptation the source's and the
    target's (whose "source" / "target")."""
    titles = {"native": "native", "hr": "high resolution"}
    prefix = "adapted " if result.kind == MOTION_KIND else ""
    out = [(prefix + titles.get(str(f.get("source")), str(f.get("source"))), "", f)
           for f in result.plausibility]
    if result.kind == MOTION_KIND:
        for name in ("source", "target"):
            other = result.extra.get(name)
            if isinstance(other, Result):
                out += [(f"{name} {titles.get(str(f.get('source')), str(f.get('source')))}",
                         name, f) for f in other.plausibility]
    return out


def _plausibility_html(result: Result) -> str:
    """The warning box of the plausibility flags (or one quiet line of the ranges)."""
    flags = _flags_by_column(result)
    ranges = ", ".join(f"{k.split(' (')[0]} {lo:g}&ndash;{hi:g} {_e(k[k.rfind('(') + 1:-1])}"
                       for k, (lo, hi) in PLAUSIBLE_RANGES.items())
    if not flags:
        return (f'<p class="ok">Plausibility checks passed: {ranges}; ESV below EDV; an RV '
                "cavity at every phase; LV cavity, LV myocardium and RV cavity on every "
                "mid-ventricular slice.</p>")
    items = "".join(f"<li>{_e(whose + ' ' if whose else '')}{_e(f.get('message'))} "
                    f"<code>{_e(f.get('code'))}</code></li>"
                    for _, whose, f in flags[:MAX_FLAGS_LISTED])
    if len(flags) > MAX_FLAGS_LISTED:
        items += (f"<li>&hellip; and {len(flags) - MAX_FLAGS_LISTED} more (every flag is in "
                  "run_report.json and measures.json)</li>")
    return (f'<div class="alert" role="alert"><strong>&#9888; {len(flags)} plausibility '
            f"warning{'s' if len(flags) != 1 else ''}: check the segmentation overlays "
            f"before using these measures</strong><ul>{items}</ul>"
            f'<span class="ok">Plausible ranges: {ranges}.</span></div>')


def _measures_html(result: Result) -> str:
    cols = _measure_columns(result)
    if not cols:
        return "<p>No measures.</p>"
    flagged: dict[tuple[str, str], list[str]] = {}
    for title, _, f in _flags_by_column(result):
        flagged.setdefault((title, str(f.get("measure"))), []).append(str(f.get("message")))
    diff = {c[0] for c in cols} >= {"native", "high resolution"}
    head = "".join(f"<th>{_e(t)}</th>" for t, _, _ in cols)
    if diff:
        head += "<th>hr &minus; native</th>"
    rows = []
    for name in MEASURE_COLUMNS:
        cells = ""
        for t, m, _ in cols:
            why = flagged.get((t, name))
            if why:
                cells += (f'<td class="num flag" title="{_e("; ".join(why))}">'
                          f"&#9888; {_num(m.get(name))}</td>")
            else:
                cells += f'<td class="num">{_num(m.get(name))}</td>'
        if diff:
            a, b = result.measures["native"].get(name), result.measures["hr"].get(name)
            d = None if a is None or b is None else float(b) - float(a)
            cells += f'<td class="num">{_num(d)}</td>'
        rows.append(f"<tr><th>{_e(name)}</th>{cells}</tr>")
    for label, key in (("ED frame", "ed_phase"), ("ES frame", "es_phase")):
        cells = ""
        for _, m, ids in cols:
            idx = m.get(key)
            frame = ids[idx] if isinstance(idx, int) and 0 <= idx < len(ids) else None
            cells += f'<td class="num">{_e(frame) if frame is not None else "&ndash;"}</td>'
        rows.append(f"<tr><th>{label}</th>{cells}{'<td></td>' if diff else ''}</tr>")
    src = "".join(f"<td>{_e(m.get('ed_es_from', ''))}</td>" for _, m, _ in cols)
    rows.append(f"<tr><th>ED/ES from</th>{src}{'<td></td>' if diff else ''}</tr>")
    return (_plausibility_html(result)
            + f"<table><tr><th>measure</th>{head}</tr>{''.join(rows)}</table>"
            "<p class=\"sub\">ukbb_cardiac conventions: volume = voxel count &times; voxel "
            "volume (slice spacing, not thickness); LVM = myocardium at ED &times; 1.05 g/mL.</p>")


def _study_html(result: Result) -> str:
    s = study_summary(result)
    ed, es = result.ed_index, result.es_index
    ids = s["frame_ids"]

    def lst(v):
        return ", ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else v

    rows = [
        ("source", s.get("source")), ("format", s.get("format")),
        ("description", s.get("description")), ("series UID", s.get("series_uid")),
        ("phases", f"{len(ids)} reconstructed of {s.get('phases')} (frames {lst(ids)})"),
        ("ED / ES frame", f"{ids[ed] if ed is not None else '-'} / "
                          f"{ids[es] if es is not None else '-'}"),
        ("slices", s.get("slices")), ("matrix (rows x columns)", " x ".join(map(str, s["matrix"]))),
        ("pixel spacing (mm)", lst(s.get("pixel_spacing_mm"))),
        ("slice gap (mm)", s.get("slice_gap_mm")),
        ("slice thickness (mm)", s.get("slice_thickness_mm")),
        ("orientation", s.get("orientation")),
        ("high-resolution volume",
         f"x{result.interp}: {result.hr_geometry.n_slices} slices, "
         + (f"{result.hr_geometry.slice_spacing:.4g} mm apart, " if result.hr_geometry.n_slices > 1 else "")
         + f"pixel {result.hr_geometry.pixel_spacing[0]:.4g} mm"),
    ]
    return _kv_table((k, v) for k, v in rows if v not in (None, ""))


def _inversion_html(result: Result) -> str:
    inv = inversion_summary(result)
    if not inv.get("images"):
        return "<p>No inversion report.</p>"
    rows = [("images", inv["images"])]
    if "steps_mean" in inv:
        rows.append(("steps (mean, min-max)",
                     f"{inv['steps_mean']:.1f} ({inv['steps_min']}-{inv['steps_max']})"))
    if "psnr_init_mean" in inv or "psnr_mean" in inv:
        rows.append(("PSNR mean: G(E(x)) -> G(w*) (dB)",
                     f"{_num(inv.get('psnr_init_mean'), 2)} -> {_num(inv.get('psnr_mean'), 2)}"))
        rows.append(("PSNR min: G(E(x)) -> G(w*) (dB)",
                     f"{_num(inv.get('psnr_init_min'), 2)} -> {_num(inv.get('psnr_min'), 2)}"))
    if "loss_mean" in inv:
        rows.append(("loss mean: initial -> final",
                     f"{_num(inv.get('loss_init_mean'), 4)} -> {_num(inv.get('loss_mean'), 4)}"))
    if "stopped_early" in inv:
        rows.append(("stopped early (plateau)", f"{inv['stopped_early']} of {inv['images']}"))
    if inv.get("roi_fallback"):
        rows.append(("fallback ROI (no heart in G(E(x)))", f"{inv['roi_fallback']} of {inv['images']}"))
    for k, v in (inv.get("settings") or {}).items():
        rows.append((f"setting {k}", v))
    return _kv_table(rows)


def _timings_html(result: Result, outputs_s: float | None) -> str:
    items = [(str(k), float(v)) for k, v in result.timings.items()]
    if not items:
        return "<p>No timings.</p>"
    total = sum(v for _, v in items)
    top = max(v for _, v in items) or 1.0
    rows = "".join(
        f'<tr><th>{_e(k)}</th><td class="num">{v:.3f}</td>'
        f'<td class="num">{(100 * v / total if total else 0):.1f}</td>'
        f'<td><span class="bar" style="width:{max(1, round(220 * v / top))}px"></span></td></tr>'
        for k, v in items)
    rows += f'<tr><th>total</th><td class="num">{total:.3f}</td><td class="num">100.0</td><td></td></tr>'
    note = "" if outputs_s is None else f'<p class="sub">writing outputs: {outputs_s:.2f} s</p>'
    return f"<table><tr><th>stage</th><th>s</th><th>%</th><th></th></tr>{rows}</table>{note}"


def _run_html(report: Mapping[str, Any]) -> str:
    bundle = report.get("bundle") or {}
    rows = [("kind", report.get("kind")), ("backend", report.get("backend")),
            ("device", report.get("device")), ("created (UTC)", report.get("created"))]
    rows += [(f"bundle {k}", v) for k, v in bundle.items() if k != "provenance"]
    opts = report.get("options") or {}
    out = _kv_table((k, v) for k, v in rows if v is not None)
    if bundle.get("provenance") is not None:
        out += "<h3>Model provenance</h3>" + _provenance_html(bundle["provenance"])
    if opts:
        out += "<h3>Options</h3>" + _kv_table(
            (str(k), v if isinstance(v, str) else json.dumps(v, default=str))
            for k, v in opts.items())
    vers = report.get("versions") or {}
    plat = report.get("platform") or {}
    out += "<h3>Versions</h3>" + _kv_table(
        [(k, v) for k, v in vers.items() if v is not None]
        + [("platform", plat.get("platform"))])
    return out


def _validation_html(bundle: Mapping[str, Any]) -> str:
    """The header's line on the model's recorded validation (:func:`~..bundle.
    validation_summary`), marked as a warning when it is below the project's bar."""
    summary = validation_summary(bundle.get("provenance"))
    if summary is None:
        return ""
    text = f"model validation {_e(summary[0])}"
    if summary[1] is False:
        return (f' &middot; <a class="warn" href="#warnings"><strong>&#9888; {text}: '
                "below the project's bar</strong></a>")
    return f" &middot; {text}"


def _provenance_html(prov: Any, *, depth: int = 3, inline_chars: int = 200) -> str:
    """The bundle manifest's provenance as it is (nothing added): nested objects
    flattened to ``depth`` levels ("training: seg: summary"), deeper or long values as
    JSON, folded into a <details> element (no script) when longer than
    ``inline_chars``."""
    rows: list[tuple[str, str]] = []

    def value_html(v: Any) -> str:
        if v is None:
            return "&ndash;"
        if isinstance(v, (str, int, float)):
            text = str(v)
        else:
            text = json.dumps(v, default=str)
        if len(text) <= inline_chars:
            return _e(text)
        full = json.dumps(v, default=str, indent=1) if not isinstance(v, str) else v
        return (f"<details><summary>{_e(text[:100])}&hellip;</summary>"
                f"<pre>{_e(full)}</pre></details>")

    def walk(prefix: str, v: Any, level: int) -> None:
        if isinstance(v, Mapping) and v and level < depth:
            for k, v2 in v.items():
                walk(f"{prefix}: {k}" if prefix else str(k), v2, level + 1)
        else:
            rows.append((prefix or "provenance", value_html(v)))

    walk("", prov, 0)
    return _kv_table(rows, raw=True) if rows else "<p>None recorded.</p>"


def _files_html(folder: Path, extra: Sequence[str]) -> str:
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    names = [n for n in present if n != REPORT_NAME] + [n for n in extra if n not in present]
    items = "".join(f'<li><a href="{_e(quote(n))}"><code>{_e(n)}</code></a></li>' for n in names)
    return f"<ul>{items}</ul>"


def write_report(result: Result, folder: str | Path, pictures: Mapping[str, Any], *,
                 run_report: Mapping[str, Any] | None = None,
                 extra_files: Sequence[str] = ()) -> Path:
    """Write ``folder/report.html`` for ``result``.

    pictures:    {key: relative path or list of relative paths} of PNGs inside ``folder``
                 (as returned by the outputs' picture writer); the keys of
                 :data:`PICTURES` get their own sections in that order, any other key an
                 "Other pictures" section. A path that is absolute, leaves the folder or
                 does not exist raises UsageError.
    run_report:  the run report dict (for the run section and the creation time);
                 computed from ``result`` when not given.
    extra_files: files that will exist beside the report once the folder is complete
                 (e.g. run_report.json, outputs.json), listed in the files section with
                 the files already present.
    Returns the path of the report.
    """
    folder = Path(folder)
    report = run_report if run_report is not None else build_run_report(result)
    study = result.study
    kind = "motion adaptation" if result.kind == MOTION_KIND else "reconstruction"
    title = f"deeprecon-rt {kind}: {study.description or study.source or 'study'}"

    sections: list[tuple[str, str, str]] = [
        ("study", "Study", _study_html(result)),
        ("measures", "Measures", _measures_html(result)),
    ]
    known = [k for k in PICTURES if k in pictures]
    other = [k for k in pictures if k not in PICTURES]
    for key in known + other:
        value = pictures[key]
        rels = [value] if isinstance(value, str) else list(value)
        if not rels:
            continue
        heading, caption = PICTURES.get(key, (key, None))
        figs = "".join(_figure(folder, rel, f"{heading} {i + 1}",
                               caption if i == len(rels) - 1 else None)
                       for i, rel in enumerate(rels))
        sections.append((key.replace("_", "-"), heading if key in PICTURES else f"Other: {key}",
                         figs))
    warnings = all_warnings(result)
    warn_html = ("<ul>" + "".join(f'<li class="warn">{_e(w)}</li>' for w in warnings) + "</ul>"
                 if warnings else "<p>None.</p>")
    sections += [
        ("inversion", "Inversion", _inversion_html(result)),
        ("timings", "Timings", _timings_html(result, report.get("outputs_s"))),
        ("warnings", f"Warnings ({len(warnings)})", warn_html),
        ("run", "Run", _run_html(report)),
        ("files", "Files", _files_html(folder, list(extra_files))),
    ]
    nav = "".join(f'<a href="#{sid}">{_e(h)}</a>' for sid, h, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{_e(h)}</h2>{content}</section>'
                   for sid, h, content in sections)
    bundle = result.bundle or {}
    preset = f" (preset {_e(bundle['preset'])})" if bundle.get("preset") else ""
    n_flags = len(_flags_by_column(result))
    alert = (f' &middot; <a class="warn" href="#measures"><strong>&#9888; {n_flags} plausibility '
             f"warning{'s' if n_flags != 1 else ''}</strong></a>" if n_flags else "")
    sub = (f"{_e(study.source)} &middot; created {_e(report.get('created'))} UTC &middot; "
           f"bundle {_e(bundle.get('name', '?'))}{preset} "
           f"<span class=\"mono\">{_e(str(bundle.get('sha256', ''))[:16])}</span> &middot; "
           f"{_e(report.get('backend'))} on {_e(report.get('device'))}{alert}"
           f"{_validation_html(bundle)}")
    vers = (report.get("versions") or {}).get("deeprecon", "")
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{_e(title)}</h1><p class=\"sub\">{sub}</p><nav>{nav}</nav></header>\n"
        f"{body}\n<footer>deeprecon-rt {_e(vers)}: research software, not a medical device. "
        "This page loads nothing from the network.</footer>\n</body>\n</html>\n")
    path = folder / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    return path


__all__ = ["write_report", "PICTURES", "REPORT_NAME"]
