"""HTML rendering: Jinja2 templates (autoescaped) and the formatting every page shares."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlencode

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

# Status → (words, css class). COMPLETED_WITH_ERRORS is amber with a warning sign: it must never
# read as a plain success.
STATUS = {
    "COMPLETED": ("Completed", "st-ok"),
    "COMPLETED_WITH_ERRORS": ("Completed with errors", "st-warn"),
    "FAILED": ("Failed", "st-bad"),
    "RUNNING": ("Running", "st-run"),
    "ABANDONED": ("Abandoned", "st-gone"),
}
DASH = "—"


def status_words(status: str | None) -> str:
    return STATUS.get(status or "", (status or DASH, ""))[0]


def status_class(status: str | None) -> str:
    return STATUS.get(status or "", ("", "st-other"))[1]


def fmt_int(value) -> str:
    return DASH if value is None else f"{int(value):,}".replace(",", "\u202f")


def fmt_seconds(value) -> str:
    """``330.0`` → ``5 min 30 s``; ``1.25`` → ``1.25 s``; None → —."""
    if value is None:
        return DASH
    s = float(value)
    if s < 60:
        return f"{s:.2f} s".replace(".00 s", " s")
    minutes, sec = divmod(int(round(s)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{days} d" if days else "", f"{hours} h" if hours else "", f"{minutes} min" if minutes else "",
             f"{sec} s" if sec else ""]
    return " ".join(p for p in parts if p) or "0 s"


def fmt_bytes(value) -> str:
    if value is None:
        return DASH
    n = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_usd(value) -> str:
    return DASH if value is None else f"${float(value):,.4f}"


def fmt_pct(value) -> str:
    """A share (0–1) as a percentage with one decimal: 0.9731 → "97.3%"."""
    return DASH if value is None else f"{float(value):.1%}"


def or_dash(value) -> str:
    return DASH if value is None or value == "" else str(value)


_env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                   autoescape=select_autoescape(("html",), default_for_string=True, default=True),
                   undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_env.filters.update(status_words=status_words, status_class=status_class, n=fmt_int, secs=fmt_seconds,
                    size=fmt_bytes, usd=fmt_usd, pct=fmt_pct, dash=or_dash, q=lambda v: quote(str(v), safe=""),
                    query=lambda d: urlencode({k: v for k, v in d.items() if v not in (None, "")}))


def render(template: str, **context) -> str:
    return _env.get_template(template).render(**context)
