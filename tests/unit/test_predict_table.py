"""``jobworker predict``'s table: a row per input row, a column per output, argmax."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from scheduler.cli.serving import MAX_OUTPUT_COLUMNS, outputs_table


def _lines(table: Table) -> list[str]:
    console = Console(record=True, width=200, color_system=None)
    console.print(table)
    return console.export_text().splitlines()


def _row(lines: list[str], first_cell: str) -> list[str]:
    return next(
        cells
        for line in lines
        if (cells := [c.strip() for c in line.strip("│┃ ").split("│")])[0] == first_cell
    )


def test_classifier_rows_get_one_column_per_score_and_their_argmax() -> None:
    lines = _lines(outputs_table([[0.1, 2.5, -1.0], [3.0, 0.0, 0.5]]))
    header = next(line for line in lines if "argmax" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == ["row", "0", "1", "2", "argmax"]
    assert _row(lines, "0") == ["0", "0.1", "2.5", "-1", "1"]
    assert _row(lines, "1") == ["1", "3", "0", "0.5", "0"]


def test_wide_rows_show_their_first_columns_and_the_argmax_of_all() -> None:
    width = MAX_OUTPUT_COLUMNS + 5
    scores = [0.0] * width
    scores[-1] = 9.0  # the best score lies beyond the columns shown
    cells = _row(_lines(outputs_table([scores])), "0")
    assert len(cells) == 1 + MAX_OUTPUT_COLUMNS + 2 and cells[-2:] == ["…", str(width - 1)]


def test_scalar_outputs_and_other_shapes_take_one_column_without_argmax() -> None:
    lines = _lines(outputs_table([1.5, 2.0]))
    assert not any("argmax" in line for line in lines)
    assert _row(lines, "0") == ["0", "1.5"]
    single = _lines(outputs_table([[0.7], [0.2]]))
    assert not any("argmax" in line for line in single) and _row(single, "1") == ["1", "0.2"]
    nested = _lines(outputs_table([{"label": "cat"}]))
    assert _row(nested, "0") == ["0", '{"label": "cat"}']
