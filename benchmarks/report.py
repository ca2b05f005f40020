"""What every benchmark script shares: percentiles and the printed table."""

from __future__ import annotations


def pct(values, q: float) -> float:
    """The q-quantile (0..1) of `values`, nearest rank."""
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def print_table(rows: list[tuple[str, str, str]], figure_width: int = 16) -> None:
    """Rows of (benchmark, figure, detail) as an aligned text table."""
    w = max(len(r[0]) for r in rows)
    print(f"{'benchmark':<{w}}  {'figure':>{figure_width}}  detail")
    print("-" * (w + figure_width + 40))
    for name, fig, detail in rows:
        print(f"{name:<{w}}  {fig:>{figure_width}}  {detail}")
