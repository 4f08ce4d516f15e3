"""Historian timestamps -> UTC instants, with naive local times localised explicitly.

Used by historian.py (the sample timestamps) and runs.py (run start and end). Timestamps with
an offset (`...+01:00`, `...Z`) or a tz-aware Parquet type are converted to UTC. Naive ones are
local times in the configured IANA zone; the hour that repeats when DST ends is ambiguous and
the hour skipped when it starts does not exist, so those are never guessed: they raise, or
with `dst_policy: reject` come back flagged for rejects.csv. Text is parsed once per distinct
string, which is what makes a million-row export cheap (it repeats each instant per tag).
"""

from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from data_pipelines.errors import DataValidationError

# Codes 1, 2, 3 of ParsedTimestamps.error; 0 = parsed.
TIMESTAMP_ERRORS = ("unparseable_timestamp", "ambiguous_local_time", "nonexistent_local_time")
DST_POLICIES = ("raise", "reject")
NAT = np.iinfo(np.int64).min
# An offset follows a time of day, with or without a space ("06:00:00+01:00", "06:00:00 Z",
# a format's "%H:%M:%S %z"): a date alone ("2025-03-01") ends in "-01", no offset.
_HAS_OFFSET = r"[T ]\d[\d:.,]*\s*(?:Z|[+-]\d{2}(?::?\d{2})?)$"
# The instants int64 nanoseconds hold (1677-09-21 to 2262-04-11); outside: unparseable.
_NS_RANGE = (pd.Timestamp.min, pd.Timestamp.max)
# No plant historian holds samples from before 1980: earlier instants are placeholders of a
# time never set (Unix 1970-01-01, Excel 1899-12-30 / 1900-01-01, Windows 1601-01-01).
EARLIEST_NS = pd.Timestamp("1980-01-01", tz="UTC").value
_NS_PER_UNIT = {"s": 10**9, "ms": 10**6, "us": 10**3}


class ParsedTimestamps(NamedTuple):
    """Parsed timestamps, one per input cell.

    Attributes:
        ns: int64 nanoseconds since 1970-01-01 UTC; NAT where error != 0.
        error: int8, 0 = parsed, k = TIMESTAMP_ERRORS[k - 1].
        text: the cell text where error != 0, NaN elsewhere (pd.Categorical).
    """

    ns: np.ndarray
    error: np.ndarray
    text: pd.Categorical


def parse_timestamps(
    column: pa.ChunkedArray | pa.Array,
    *,
    file: str,
    timezone: str,
    dst_policy: str = "raise",
    timestamp_format: str = "ISO8601",
    row_numbers: np.ndarray | None = None,
) -> ParsedTimestamps:
    """Parse a timestamp column (text or arrow timestamp) into UTC nanoseconds.

    Args:
        column: the column as read; text (string or dictionary) or an arrow timestamp/date.
        file: file name for messages.
        timezone: IANA zone of naive timestamps.
        dst_policy: "raise" (ambiguous/nonexistent local time is fatal) or "reject" (it
            is flagged in `error` and the row is rejected later).
        timestamp_format: pandas format of the text; "ISO8601" accepts offsets and fractions.
        row_numbers: each cell's 1-based row in the file, for messages (None: 1, 2, ...;
            blank lines left out of `column` keep the rows after them at their numbers).

    Returns:
        ParsedTimestamps, aligned with `column`. Unparseable text and empty cells are flagged
        `unparseable_timestamp`, never raised: validate.py decides whether there are too many.
        So is an instant before 1980 (EARLIEST): the placeholder of a time never set.

    Raises:
        DataValidationError: a column that is neither text nor time; with dst_policy
            "raise", the first ambiguous or nonexistent local time, naming file and row.
    """
    if isinstance(column, pa.ChunkedArray) and not column.num_chunks:
        column = pa.array([], pa.string())
    kind = column.type
    if pa.types.is_date(kind):  # seconds hold every date; _from_arrow_time checks the ns range
        column, kind = column.cast(pa.timestamp("s")), pa.timestamp("s")
    if pa.types.is_timestamp(kind):
        parsed = _from_arrow_time(column, timezone)
    elif pa.types.is_dictionary(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind):
        parsed = _whole_column_iso(column, timezone) if timestamp_format == "ISO8601" else None
        if parsed is None:
            if isinstance(column, pa.ChunkedArray):
                column = column.combine_chunks()
            try:
                parsed = _from_text(column, timezone, timestamp_format)
            except DataValidationError as error:
                raise DataValidationError(f"{file}: {error}") from error
    else:
        raise DataValidationError(f"{file}: timestamp column has type {kind}, not text or time")
    parsed = _placeholders_unparseable(parsed)
    if dst_policy == "raise":
        _raise_on_dst(parsed, file, timezone, row_numbers)
    return parsed


def _placeholders_unparseable(parsed: ParsedTimestamps) -> ParsedTimestamps:
    """Instants before EARLIEST flagged unparseable, with their UTC text: a Unix epoch 0 or
    an Excel zero date in a plant file stood for "no time", and one sample of it was held
    into the real data, decades later, as the start of its run."""
    early = np.flatnonzero((parsed.error == 0) & (parsed.ns < EARLIEST_NS))
    if not early.size:
        return parsed
    ns, error = parsed.ns.copy(), parsed.error.copy()
    text = np.asarray(parsed.text.astype(object))
    text[early] = [f"{t} (before 1980: a placeholder)" for t in iso_utc(ns[early])]
    ns[early], error[early] = NAT, 1
    return ParsedTimestamps(ns, error, pd.Categorical(text))


def _whole_column_iso(column, timezone: str) -> ParsedTimestamps | None:
    """The common case in one arrow cast: every cell ISO 8601, all with or all without offset.

    Returns None, sending the column to the per-string path, when arrow refuses a cell (a
    bad or padded string, offsets mixed with naive times) or a local time falls in a DST
    change (the per-string path reports it with the file's own text).
    """
    if pa.types.is_dictionary(column.type):
        column = column.cast(pa.string())
    for kind in (pa.timestamp("ns", tz="UTC"), pa.timestamp("ns")):
        try:
            cast = pc.cast(column, kind)
        except pa.ArrowInvalid:
            continue
        parsed = _from_arrow_time(cast, timezone)
        return None if (parsed.error > 1).any() else parsed
    return None


def _from_text(column: pa.Array, timezone: str, timestamp_format: str) -> ParsedTimestamps:
    """Parse each distinct string once, then spread the result over the rows by code."""
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column)
    codes = column.indices.fill_null(-1).to_numpy().astype(np.int64)
    # arrow compute on the distinct strings: C++ loops, not a Python call per string
    dictionary = pc.utf8_trim_whitespace(column.dictionary.cast(pa.string()))
    strings = pd.Series(dictionary.to_numpy(zero_copy_only=False), dtype=object)  # for text
    n = len(strings)
    ns = np.full(n, NAT, dtype=np.int64)
    error = np.ones(n, dtype=np.int8)
    if n:
        aware = pc.match_substring_regex(dictionary, _HAS_OFFSET).to_numpy(zero_copy_only=False)
        if aware.any():
            ns[aware] = _parse_text(dictionary.filter(aware), timestamp_format, aware=True)
            error[aware] = np.where(ns[aware] == NAT, 1, 0)
        if (~aware).any():
            local = _parse_text(dictionary.filter(~aware), timestamp_format, aware=False)
            ns[~aware], error[~aware] = _localize(pd.DatetimeIndex(local.view("M8[ns]")), timezone)
    # A null cell (code -1) takes an extra last slot: unparseable, its text "".
    ns, error = np.append(ns, NAT), np.append(error, np.int8(1))
    codes = np.where(codes == -1, n, codes)
    text_codes = np.where(error[codes] != 0, codes, -1)
    categories = pd.Index(np.append(strings.to_numpy(dtype=object), ""), dtype=object)
    if n and (strings == "").any():  # a Parquet file may hold "" itself: one category
        text_codes = np.where(text_codes == n, int(np.flatnonzero(strings == "")[0]), text_codes)
    return ParsedTimestamps(ns[codes], error[codes], _compact(text_codes, categories))


def _parse_text(strings: pa.Array, timestamp_format: str, *, aware: bool) -> np.ndarray:
    """Distinct timestamp strings -> int64 ns (UTC if `aware`, else wall clock); NAT if bad.

    ISO 8601 goes through arrow's parser first (C++, about 20x pandas' speed on a million
    distinct strings, which an export with jittered source timestamps has). Arrow fails the
    whole column on one bad string; pandas then decides string by string.
    """
    if timestamp_format == "ISO8601":
        kind = pa.timestamp("ns", tz="UTC") if aware else pa.timestamp("ns")
        try:
            parsed = pc.cast(strings, kind).to_numpy(zero_copy_only=False)
            return parsed.astype("M8[ns]").view(np.int64)
        except pa.ArrowInvalid:
            pass
    series = pd.Series(strings.to_numpy(zero_copy_only=False), dtype=object)
    try:
        parsed = pd.DatetimeIndex(
            pd.to_datetime(series, utc=aware, format=timestamp_format, errors="coerce")
        )
    except ValueError as error:  # e.g. mixed offsets _HAS_OFFSET did not see as offsets
        raise DataValidationError(
            f"timestamps such as {series.iloc[0]!r} cannot be read with timestamp_format "
            f"{timestamp_format!r}: {error}"
        ) from error
    if not aware and parsed.tz is not None:
        # Localising such an instant again would move it by the zone's offset, silently.
        raise DataValidationError(
            f"timestamps such as {series.iloc[0]!r} carry a UTC offset in a form not "
            "recognised as one; write it ISO 8601 style (+01:00 or Z after the time)"
        )
    return _ns(parsed)


def _from_arrow_time(column: pa.Array, timezone: str) -> ParsedTimestamps:
    """Arrow timestamps: tz-aware ones are instants; naive ones are local times."""
    aware = column.type.tz is not None
    outside_rows, outside_text = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object)
    if column.type.unit != "ns":  # a coarser unit holds instants ns cannot ("0001-01-01")
        per_unit = _NS_PER_UNIT[column.type.unit]
        ticks = column.cast(pa.int64())
        outside = pc.fill_null(pc.or_(pc.less(ticks, _NS_RANGE[0].value // per_unit + 1),
                                      pc.greater(ticks, _NS_RANGE[1].value // per_unit)), False)
        outside_rows = np.flatnonzero(outside.to_numpy(zero_copy_only=False))
        outside_text = column.filter(outside).cast(pa.string()).to_numpy(zero_copy_only=False)
        column = pc.if_else(outside, pa.scalar(None, column.type), column)
    column = column.cast(pa.timestamp("ns", tz=column.type.tz))
    values = column.to_numpy(zero_copy_only=False)
    ns = values.astype("M8[ns]").view(np.int64).copy()
    error = np.where(ns == NAT, 1, 0).astype(np.int8)
    if not aware:
        codes, uniques = pd.factorize(ns)
        local_ns, local_error = _localize(pd.DatetimeIndex(uniques.view("M8[ns]")), timezone)
        ns, error = local_ns[codes], np.maximum(error, local_error[codes])
    # text only where a row failed: str() of a million times would cost more than the rest
    bad = np.flatnonzero(error != 0)
    bad_text = pd.Series(values[bad].astype("M8[ns]")).astype(str).to_numpy(dtype=object)
    bad_text[pd.isna(values[bad])] = ""
    bad_text[np.searchsorted(bad, outside_rows)] = outside_text  # as the file holds them
    categories, bad_codes = np.unique(bad_text.astype(str), return_inverse=True)
    codes = np.full(len(ns), -1, dtype=np.int64)
    codes[bad] = bad_codes
    text = pd.Categorical.from_codes(codes, categories=pd.Index(categories, dtype=object))
    return ParsedTimestamps(ns, error, text)


def _localize(naive: pd.DatetimeIndex, timezone: str) -> tuple[np.ndarray, np.ndarray]:
    """Local wall-clock times in `timezone` -> (UTC ns, error code).

    Ambiguous times come out NaT with ambiguous="NaT" but not when told they are standard
    time; nonexistent ones come out NaT either way. That difference tells the two apart.
    """
    parsed = naive.notna()
    if timezone in ("UTC", "Etc/UTC"):  # no DST: the wall clock is the instant
        return _ns(naive), np.where(parsed, 0, 1).astype(np.int8)
    either = naive.tz_localize(timezone, ambiguous="NaT", nonexistent="NaT")
    standard = naive.tz_localize(
        timezone, ambiguous=np.zeros(len(naive), dtype=bool), nonexistent="NaT"
    )
    nonexistent = parsed & standard.isna()
    ambiguous = parsed & either.isna() & ~standard.isna()
    error = np.select([~parsed, ambiguous, nonexistent], [1, 2, 3], 0).astype(np.int8)
    return _ns(either), error


def _ns(index: pd.DatetimeIndex) -> np.ndarray:
    """Nanoseconds since the epoch, UTC; NaT -> NAT, as is an instant nanoseconds cannot
    hold (a "9999-12-31" end-of-time marker): unparseable, not a crash of the whole file."""
    if index.tz is not None:
        index = index.tz_convert("UTC").tz_localize(None)
    index = index.where((index >= _NS_RANGE[0]) & (index <= _NS_RANGE[1]))
    return index.as_unit("ns").asi8.copy()


def _compact(codes: np.ndarray, categories: pd.Index) -> pd.Categorical:
    """A categorical holding only the categories that are used (the failed strings)."""
    used = np.unique(codes[codes >= 0])
    remap = np.full(len(categories) + 1, -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return pd.Categorical.from_codes(remap[codes], categories=categories[used])


def _raise_on_dst(parsed: ParsedTimestamps, file: str, timezone: str,
                  row_numbers: np.ndarray | None) -> None:  # fmt: skip
    for code, why in (
        (2, "is ambiguous in {tz}: the hour repeats when DST ends"),
        (3, "does not exist in {tz}: clocks skip that hour when DST starts"),
    ):
        hits = np.flatnonzero(parsed.error == code)
        if hits.size:
            row = int(hits[0]) + 1 if row_numbers is None else int(row_numbers[hits[0]])
            raise DataValidationError(
                f"{file} row {row}: local time {parsed.text[hits[0]]!r} "
                f"{why.format(tz=timezone)} ({hits.size} rows like it); export timestamps "
                "with a UTC offset, or set data.dst_policy: reject to send them to rejects.csv"
            )


def iso_utc(ns: np.ndarray) -> np.ndarray:
    """UTC nanoseconds -> ISO 8601 text with milliseconds and offset, "" for NAT.

    Example: 1740808800000000000 -> "2025-03-01T06:00:00.000+00:00" (the export's style).
    """
    ns = np.asarray(ns, dtype=np.int64)
    text = pd.DatetimeIndex(ns.view("M8[ns]")).strftime("%Y-%m-%dT%H:%M:%S.%f")
    text = pd.Series(text, dtype=object).str[:-3] + "+00:00"
    return text.where(ns != NAT, "").to_numpy(dtype=object)
