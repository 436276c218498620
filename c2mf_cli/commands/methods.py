"""`c2mf methods`: the factorization methods `c2mf factorize --method` accepts."""

from __future__ import annotations

from ._console import out, print_json
from .options import option


def methods(json_out: bool = option("json")) -> None:
    """List the factorization methods `c2mf factorize --method` accepts.

    Example: c2mf methods
    """
    from rich.table import Table

    from ..methods import method_table

    rows = method_table()
    if json_out:
        print_json(rows)
        return
    table = Table(title="c2mf factorize --method", title_justify="left")
    for col in ("name", "learns from", "dictionary", "needs A >= 0", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], "whole images" if r["learns_from"] == "full" else "crops",
                      "signed" if r["signed_dictionary"] else "W >= 0",
                      "yes" if r["requires_nonnegative_input"] else "no", r["description"])
    out.print(table)
