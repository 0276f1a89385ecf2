"""``jobworker predict``'s table: a row per input row, argmax, then a column per output."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from scheduler.cli.serving import MAX_OUTPUT_COLUMNS, outputs_table


def _lines(table: Table, width: int = 200) -> list[list[str]]:
    console = Console(record=True, width=width, color_system=None)
    console.print(table)
    return [line.split() for line in console.export_text().splitlines() if line.strip()]


def test_classifier_rows_get_their_argmax_then_one_column_per_score() -> None:
    lines = _lines(outputs_table([[0.1, 2.5, -1.0], [3.0, 0.0, 0.5]]))
    assert lines == [
        ["row", "argmax", "0", "1", "2"],
        ["0", "1", "0.1", "2.5", "-1"],
        ["1", "0", "3", "0", "0.5"],
    ]


def test_ten_classes_fit_an_80_column_terminal_uncut() -> None:
    scores = [[-0.123456 * (i + 1) * (-1) ** i for i in range(10)] for _ in range(2)]
    header, first, _ = _lines(outputs_table(scores), width=80)
    assert header == ["row", "argmax", *map(str, range(10))]
    assert first[:2] == ["0", "9"] and first[2:] == [f"{v:.3g}" for v in scores[0]]


def test_wide_rows_show_their_first_columns_and_the_argmax_of_all() -> None:
    width = MAX_OUTPUT_COLUMNS + 5
    scores = [0.0] * width
    scores[-1] = 9.0  # the best score lies beyond the columns shown
    header, row = _lines(outputs_table([scores]))
    assert header[-1] == "…" and len(header) == 2 + MAX_OUTPUT_COLUMNS + 1
    assert row[1] == str(width - 1) and row[-1] == "…"


def test_scalar_outputs_and_other_shapes_take_one_column_without_argmax() -> None:
    assert _lines(outputs_table([1.5, 2.0])) == [["row", "output"], ["0", "1.5"], ["1", "2"]]
    assert _lines(outputs_table([[0.7], [0.2]])) == [["row", "0"], ["0", "0.7"], ["1", "0.2"]]
    assert _lines(outputs_table([{"label": "cat"}]))[1] == ["0", '{"label":', '"cat"}']
