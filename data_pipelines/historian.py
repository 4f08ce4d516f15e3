"""Historian export files -> one long frame `timestamp, tag, value, quality` per file.

First stage of `twin prepare` (read_historian -> validate -> align_runs -> write_dataset). It
reads what PI or OPC UA historians export: long (`timestamp, tag, value[, quality][, unit]`)
or wide (`timestamp` or an unnamed first column, then one column per tag, optionally headed
`TAG [unit]`, a quality string in a cell where the historian had no good value), as CSV or
Parquet. Nothing is judged here except what makes the file unreadable: cells that do not
parse are kept, with their text, for validate.py to reject with a reason.

Row numbers: `row` is the 1-based data row of the file, the header not counted. In a CSV file
row 1 is the line after the header (file line = row + 1); in a Parquet file it is the table's
row index + 1. Every cell of a wide row carries that row's number.
"""

import csv
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from data_pipelines.errors import DataValidationError
from data_pipelines.timestamps import TIMESTAMP_ERRORS, parse_timestamps

SUFFIXES = (".csv", ".parquet")
# `__index_level_0__` last: the unnamed DatetimeIndex of a frame pandas wrote to Parquet,
# where no column is named as a timestamp (else it is a row index, not read)
_TIMESTAMP_NAMES = ("timestamp", "time", "datetime", "date_time", "__index_level_0__")
_INDEX_LEVEL = re.compile(r"^__index_level_\d+__$")
_TAG_NAMES = ("tag", "tagname", "tag_name", "tag name")  # "TagName": AVEVA / Wonderware
_UNIT_HEADER = re.compile(r"^(?P<tag>.+?)\s*\[(?P<unit>[^\]]*)\]\s*$")
_TEXT = pa.dictionary(pa.int32(), pa.string())


@dataclass(frozen=True)
class UnitClaim:
    """A unit the export states for a tag: `where` is "row 4" or "header column 3"."""

    file: str
    where: str
    tag: str
    unit: str


@dataclass
class HistorianTable:
    """One historian file in long form.

    Attributes:
        file: the file name used in messages and rejects.csv.
        layout: "long" or "wide".
        frame: one row per historian sample, in file order, with columns
            row (int64, 1-based data row), timestamp (datetime64[ns, UTC], NaT where it did
            not parse or the local time does not exist), tag (category), value (float64, NaN
            where empty or not a number), quality (category, NaN where the file gives none),
            timestamp_error (category: unparseable_timestamp, ambiguous_local_time,
            nonexistent_local_time), timestamp_text and value_text (category: the cell's
            text where it did not parse, NaN elsewhere).
        unit_claims: units stated by the file itself (a long `unit` column, wide headers).
        empty_cells: wide cells left empty (a multi-rate tag not sampled at that row); they
            are not samples, so they are counted here and not as rows.
    """

    file: str
    layout: str
    frame: pd.DataFrame
    unit_claims: list[UnitClaim] = field(default_factory=list)
    empty_cells: int = 0


def read_historian(
    path: Path,
    *,
    timezone: str,
    dst_policy: str = "raise",
    timestamp_format: str = "ISO8601",
    tag_names: Collection[str] = (),
    quality_column: str = "quality",
    ignore_columns: Collection[str] = (),
) -> HistorianTable:
    """Read one long or wide historian export, CSV or Parquet, into the long frame.

    Args:
        path: a `.csv` or `.parquet` file.
        timezone: IANA zone in which naive timestamps (no offset) are local times.
        dst_policy: "raise" or "reject" for naive local times that DST makes ambiguous or
            nonexistent (with "reject" they come back flagged in `timestamp_error`).
        timestamp_format: pandas format of timestamp strings; "ISO8601" by default.
        tag_names: the dictionary's tags: a wide header that is one of them as written is
            that tag, brackets and all (`FIC101[PV]`, a PI attribute), not `TAG [unit]`.
        quality_column: the long layout's quality column (`status`, `OPCQuality`, ...);
            matched as `tag` and `value` are, case and padding aside.
        ignore_columns: other columns of a long file, left unread (a description, a
            server name). Any column not named here nor read is refused: a quality flag
            under another name was ignored, and its bad samples taken as good.

    Returns:
        The HistorianTable; `frame` columns as documented there.

    Raises:
        DataValidationError: unreadable file or unsupported suffix, no timestamp column,
            no data rows, duplicate column names or tags, a timestamp or value column of a
            type that is neither text nor time/number, or (dst_policy "raise") a
            DST-ambiguous or nonexistent local time, naming file and row.
    """
    table = _read_table(path)
    name = path.name
    names = table.column_names
    if len(names) > 1 and not names[-1].strip() and table.column(-1).null_count == len(table):
        # a comma ending every line: a nameless empty last column, not a tag (beside an
        # unnamed timestamp column it also made the names look duplicated)
        table = table.remove_column(len(names) - 1)
        names = table.column_names
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise DataValidationError(f"{name}: duplicate column names {dupes}")
    ts_col = _timestamp_column(names, name)
    table, row_numbers = _without_blank_rows(table)
    if table.num_rows == 0:
        raise DataValidationError(f"{name}: no data rows below the header")
    parsed = parse_timestamps(
        table.column(ts_col),
        file=name,
        timezone=timezone,
        dst_policy=dst_policy,
        timestamp_format=timestamp_format,
        row_numbers=row_numbers,
    )
    lower = {n.strip().lower(): n for n in names}  # " tag" after a comma-space separator
    tag_column = next((lower[t] for t in _TAG_NAMES if t in lower), None)
    if tag_column is not None:
        lower["tag"] = tag_column
    if "tag" in lower and "value" in lower:
        quality = _long_columns(names, ts_col, lower, quality_column, ignore_columns, name)
        return _long_table(table, parsed, lower, quality, name, row_numbers)
    if "tag" in lower:  # a long export that lost its value column, not a tag called "tag"
        raise DataValidationError(f"{name}: a `tag` column but no `value` column; found {names}")
    columns = [(position, n) for position, n in enumerate(names, start=1)
               if n != ts_col and not _pandas_index(n, position - 1)]  # fmt: skip
    return _wide_table(table, parsed, columns, name, row_numbers, frozenset(tag_names))


def read_tag_dictionary_units(path: Path) -> list[UnitClaim]:
    """Units claimed by the export's `tag_dictionary.csv` (columns `tag, unit, ...`).

    Args:
        path: the export's tag_dictionary.csv.

    Returns:
        One UnitClaim per row, `where` = "row N" (1-based data row).

    Raises:
        DataValidationError: unreadable file or no `tag`/`unit` column.
    """
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise DataValidationError(f"{path.name}: cannot read the file: {err}") from err
    missing = [c for c in ("tag", "unit") if c not in frame.columns]
    if missing:
        raise DataValidationError(
            f"{path.name}: missing columns {missing}; found {list(frame.columns)}"
        )
    return [
        UnitClaim(path.name, f"row {i + 1}", tag.strip(), unit.strip())
        for i, (tag, unit) in enumerate(zip(frame["tag"], frame["unit"], strict=True))
    ]


def _read_table(path: Path) -> pa.Table:
    """Read a CSV (every column as text, so no cell is lost to type guessing) or Parquet file."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataValidationError(f"{path.name}: unsupported file type; expected {SUFFIXES}")
    try:
        if suffix == ".parquet":
            return pq.read_table(path)
        header = _csv_header(path)
        # Dictionary-encoded while parsing where values repeat (tags, quality, units); the rest,
        # timestamps included, as plain text so that no cell is lost to type guessing.
        types = {
            n: (_TEXT if n.strip().lower() in ("tag", "quality", "unit") else pa.string())
            for n in header
        }
        # only an empty cell is "no value": "N/A" or "NULL" are texts a person should see
        options = pcsv.ConvertOptions(
            column_types=types, strings_can_be_null=True, null_values=[""]
        )
        # A blank line stays a row (of empty cells, rejected as such): skipped, it would shift
        # the `row` of every later reject off the file's line (line = row + 1)
        parse = pcsv.ParseOptions(ignore_empty_lines=False)
        return pcsv.read_csv(path, parse_options=parse, convert_options=options)
    except (OSError, pa.ArrowException, UnicodeDecodeError, csv.Error) as err:
        hint = _csv_hint(path, err) if suffix == ".csv" else ""
        raise DataValidationError(f"{path.name}: cannot read the file: {err}{hint}") from err


def _csv_hint(path: Path, error: Exception) -> str:
    """What a CSV the reader refused looks like, from its first bytes: the encodings and
    separators Excel and European locales write, which only name a byte or a column count."""
    try:
        with path.open("rb") as handle:
            header = handle.readline()  # whole: a wide header of 240 tags is over 4 KB
    except OSError:
        return ""
    save_as = "; save it as comma-separated CSV UTF-8, with . as the decimal mark"
    if header.startswith((b"\xff\xfe", b"\xfe\xff")):
        return f" (the file is UTF-16, Excel's 'Unicode text'{save_as})"
    try:
        first_line = header.decode("utf-8-sig")
    except UnicodeDecodeError:
        return f" (the file is not UTF-8, e.g. Windows-1252{save_as})"
    # a byte further on (a "Gestört" in row 1501): Python's decoder met it in the header's
    # 8 KB read, or arrow ("UTF8") further on
    if isinstance(error, UnicodeDecodeError) or "UTF8" in str(error):
        with path.open("rb") as handle:
            for line_number, line in enumerate(handle, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    return f" (row {line_number - 1} is not UTF-8, e.g. Windows-1252{save_as})"
    for separator, name in ((";", "semicolons"), ("\t", "tabs")):
        if separator in first_line and "," not in first_line:
            return f" (its header is separated by {name}{save_as})"
    return ""


def _csv_header(path: Path) -> list[str]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise DataValidationError(f"{path.name}: the file is empty (no header line)")
    return header


def _timestamp_column(names: list[str], file: str) -> str:
    """The timestamp column: named like one, or the unnamed first column of a wide export."""
    by_name = {name.strip().lower(): name for name in names}
    for candidate in _TIMESTAMP_NAMES:  # in their order: a named column before an index
        if candidate in by_name:
            return by_name[candidate]
    if names and _nameless(names[0]):
        return names[0]
    raise DataValidationError(
        f"{file}: no timestamp column; expected one named {list(_TIMESTAMP_NAMES)} or an "
        f"unnamed first column, found {names[:10]}"
    )


def _without_blank_rows(table: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """The rows holding any cell, and their 1-based row numbers in the file (line = row + 1).

    A blank line (or one of commas only) holds no sample: it is left out, and the rows after
    it keep the numbers of their lines, so rejects.csv points at the right one.
    """
    blank = np.ones(table.num_rows, dtype=bool)
    for column in table.columns:
        blank &= column.is_null().to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(~blank).astype(np.int64) + 1
    return (table.filter(pa.array(~blank)) if blank.any() else table), rows


def _long_columns(names: list[str], ts_col: str, lower: dict, quality_column: str,
                  ignore_columns: Collection[str], file: str) -> str | None:  # fmt: skip
    """The long file's quality column (None: it has none, all samples good), after checking
    that it has no column that would be left unread without being named in ignore_columns.

    Raises:
        DataValidationError: a named quality column other than the default is missing, or a
            column is neither read nor ignored.
    """
    key = quality_column.strip().lower()
    if key != "quality" and key not in lower:
        raise DataValidationError(
            f"{file}: no quality column {quality_column!r} (data.quality_column); found {names}"
        )
    read = {lower[k] for k in ("tag", "value", "unit", key) if k in lower}
    ignored = {c.strip().lower() for c in ignore_columns}
    unread = [n for position, n in enumerate(names)
              if n != ts_col and n not in read and n.strip().lower() not in ignored
              and not _pandas_index(n, position)]  # fmt: skip
    if unread:
        raise DataValidationError(
            f"{file}: columns {unread} are not read in the long layout (timestamp, tag, value, "
            f"{quality_column}, unit); a quality flag among them would be ignored and its bad "
            f"samples taken as good. Name the quality column with data.quality_column=<name>, "
            f"or leave the others unread with data.ignore_columns=[...]"
        )
    return lower.get(key)


def _pandas_index(name: str, position: int) -> bool:
    """A row index pandas wrote beside the data (`to_csv` with its default index=True: a
    nameless first column; `to_parquet` of a concatenated frame: `__index_level_0__`)."""
    return bool(_INDEX_LEVEL.match(name)) or (position == 0 and _nameless(name))


def _nameless(name: str) -> bool:
    """A header cell with no name (pandas reads it back as `Unnamed: 0`)."""
    return not name.strip() or name.startswith("Unnamed: 0")


def _long_table(table: pa.Table, parsed, lower: dict, quality_column: str | None, file: str,
                row_numbers: np.ndarray) -> HistorianTable:  # fmt: skip
    """Long layout: one sample per row."""
    n = table.num_rows
    values, value_text = _parse_values(table.column(lower["value"]), f"{file} column 'value'")
    tag = _as_categorical(table.column(lower["tag"]))
    quality = _as_categorical(table.column(quality_column)) if quality_column else _no_text(n)
    frame = _frame(row_numbers, parsed, tag, values, quality, value_text)
    claims = []
    if "unit" in lower:
        claims = _long_unit_claims(tag, _as_categorical(table.column(lower["unit"])), file)
    return HistorianTable(file, "long", frame, claims, 0)


def _wide_table(
    table: pa.Table, parsed, columns: list[tuple[int, str]], file: str, row_numbers: np.ndarray,
    tag_names: frozenset[str],
) -> HistorianTable:  # fmt: skip
    """Wide layout: one row per timestamp, one column per tag; empty cells are not samples.

    `columns` are the tag columns as (1-based position in the header, name); a name in
    `tag_names` is a tag as written, any other `TAG [unit]` a tag and the unit it claims."""
    n, m = table.num_rows, len(columns)
    tags, claims = [], []
    for position, column in columns:
        match = None if column in tag_names else _UNIT_HEADER.match(column)
        tags.append(match["tag"] if match else column)
        if match:
            claims.append(UnitClaim(file, f"header column {position}", match["tag"], match["unit"]))
    twice = sorted({t for t in tags if tags.count(t) > 1})
    if twice:
        raise DataValidationError(f"{file}: tags {twice} head more than one column")
    values = np.empty((n, m), dtype=np.float64)
    texts = np.full((n, m), None, dtype=object)
    for j, (_, column) in enumerate(columns):
        values[:, j], text = _parse_values(table.column(column), f"{file} column {column!r}")
        if text is not None:
            texts[:, j] = text
    has_text = pd.notna(texts)
    present = (~np.isnan(values) | has_text).ravel()  # row-major: file order
    flat_text = texts.ravel()[present]
    text_cat = pd.Categorical(flat_text)
    tag_codes = np.tile(np.arange(m), n)[present]
    tag = pd.Categorical.from_codes(tag_codes, categories=pd.Index(tags, dtype=str))
    positions = np.repeat(np.arange(n, dtype=np.int64), m)[present]
    expanded = (parsed.ns[positions], parsed.error[positions], parsed.text[positions])
    frame = _frame(row_numbers[positions], expanded, tag, values.ravel()[present], text_cat,
                   text_cat)  # fmt: skip
    return HistorianTable(file, "wide", frame, claims, int(n * m - present.sum()))


def _frame(rows, parsed, tag, values, quality, value_text) -> pd.DataFrame:
    """Assemble the long frame; `parsed` is (ns, error code, text) per row."""
    ns, error, text = parsed
    errors = pd.Categorical.from_codes(error.astype(np.int64) - 1, categories=TIMESTAMP_ERRORS)
    if value_text is None:
        value_text = pd.Categorical.from_codes(np.full(len(rows), -1), categories=[])
    return pd.DataFrame(
        {
            "row": rows,
            "timestamp": pd.Series(ns.view("M8[ns]")).dt.tz_localize("UTC"),
            "tag": tag,
            "value": values,
            "quality": quality,
            "timestamp_error": errors,
            "timestamp_text": text,
            "value_text": value_text,
        }
    )


def _parse_values(column: pa.ChunkedArray, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Numbers as float64 (NaN where empty or not a number) and the text of non-numbers.

    Returns:
        (values, text): text is None when every non-empty cell is a number, else an object
        array holding the cell text where it is not a number and None elsewhere.
    """
    kind = column.type
    if pa.types.is_null(kind):  # Parquet's type of a column with no value at all
        return np.full(len(column), np.nan), None
    if pa.types.is_floating(kind) or pa.types.is_integer(kind) or pa.types.is_decimal(kind):
        return _floats(pc.cast(column, pa.float64())), None
    if pa.types.is_dictionary(kind):
        column = pc.cast(column, pa.string())
    if not (
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_dictionary(kind)
    ):
        raise DataValidationError(f"{where}: type {kind} is neither number nor text")
    try:  # fast path: the arrow cast fails as a whole on the first non-number
        values = _floats(pc.cast(column, pa.float64()))
        if not np.isnan(values).any():
            return values, None
    except pa.ArrowInvalid:
        pass
    # Some cell is not a number, or is a text arrow reads as NaN ("nan", "NaN"): a value
    # written as text, which is told apart from an empty cell.
    strings = column.to_pandas()
    numbers = pd.to_numeric(strings, errors="coerce")
    # a cell of spaces is an empty one (a padded or fixed-width export), not a text value
    filled = strings.notna().to_numpy() & (strings.str.strip() != "").to_numpy(dtype=bool)
    text_mask = numbers.isna().to_numpy() & filled
    text = np.where(text_mask, strings.to_numpy(dtype=object), None)
    return numbers.to_numpy(dtype=np.float64, na_value=np.nan), text


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    return column.to_numpy().astype(np.float64, copy=False)


def _no_text(n: int) -> pd.Categorical:
    """n cells that hold no text (a column the file does not have, or all null)."""
    return pd.Categorical.from_codes(np.full(n, -1), categories=pd.Index([], dtype=str))


def _as_categorical(column: pa.ChunkedArray) -> pd.Categorical:
    if pa.types.is_null(column.type):  # Parquet's type of a column with no value at all
        return _no_text(len(column))
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column)
    combined = column.unify_dictionaries().combine_chunks() if column.num_chunks else column
    if isinstance(combined, pa.ChunkedArray):  # a table with no rows has no chunks
        return pd.Categorical([], categories=pd.Index([], dtype=str))
    categories = pd.Index(combined.dictionary.cast(pa.string()).to_pylist(), dtype=str)
    codes = combined.indices.fill_null(-1).to_numpy().astype(np.int64)
    return pd.Categorical.from_codes(codes, categories=categories)


def _long_unit_claims(tag: pd.Categorical, unit: pd.Categorical, file: str) -> list[UnitClaim]:
    """One claim per distinct (tag, unit) pair, at the first row that states it."""
    keep = (tag.codes >= 0) & (unit.codes >= 0)
    pairs = tag.codes.astype(np.int64) * (len(unit.categories) + 1) + unit.codes
    pairs = np.where(keep, pairs, -1)
    _, first = np.unique(pairs, return_index=True)
    return [
        UnitClaim(file, f"row {i + 1}", str(tag[i]), str(unit[i])) for i in sorted(first) if keep[i]
    ]
