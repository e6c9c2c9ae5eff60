"""Plain terminal tables and the number formats every report uses."""

from __future__ import annotations


def human_count(n: int | float) -> str:
    """1234567 -> '1.23M': parameter counts people can read at a glance."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def shorten(text: str, width: int) -> str:
    """`text` cut in the middle to at most `width` characters (both ends stay readable)."""
    return (
        text if len(text) <= width else text[: width // 2 - 1] + "…" + text[-(width - width // 2) :]
    )


def format_table(
    headers: list[str],
    rows: list[list[str]],
    *,
    footer: list[str] | None = None,
    left: int = 1,
) -> str:
    """A plain aligned table: the first `left` columns (names) left-aligned, the rest right."""
    all_rows = [headers, *rows, *([footer] if footer else [])]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        cells = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(headers))
    out = [line(headers), rule, *(line(r) for r in rows)]
    if footer:
        out += [rule, line(footer)]
    return "\n".join(out)


def pct(x: float | None) -> str:
    """0.1234 -> '12.34%'; None -> '-'."""
    if x is None:
        return "-"
    return f"{100 * x:.2f}%"
