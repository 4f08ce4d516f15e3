"""Validation: long historian frames + tag dictionary -> valid samples + rejects + counts.

Second stage of `twin prepare` (read_historian -> validate -> align_runs -> write_dataset).
File-level faults raise DataValidationError (unknown tag, wrong unit, too many unparseable
timestamps, out-of-range values under `out_of_range: raise`). Row-level faults never raise and
are never dropped silently: each rejected row gets one reason, the first that applies in the
order of REASONS, and goes to rejects.csv (rejects.py writes the messages). Every check is a
vectorised pass over all rows; the only Python loops run over files, tags or reasons.

Row numbers follow historian.py: the 1-based data row of the file, the header not counted.
"""

import unicodedata
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from data_pipelines.errors import DataValidationError, RowAccountingError
from data_pipelines.historian import HistorianTable, UnitClaim
from data_pipelines.rejects import build_rejects
from data_pipelines.runs import assign_runs, single_run
from data_pipelines.tags import TagDictionary

# Reason codes, in the order they are checked: a row gets the first that applies. Duplicates
# and time order are judged among rows that passed the checks before them, so a Bad-quality
# placeholder does not make the good sample at the same instant a duplicate.
REASONS = (
    "unparseable_timestamp",
    "ambiguous_local_time",
    "nonexistent_local_time",
    "missing_tag",
    "bad_quality",
    "non_numeric_value",
    "missing_value",
    "duplicate_timestamp",
    "time_backwards",
    "out_of_range",
    "outside_runs",
)
CODE = {reason: i + 1 for i, reason in enumerate(REASONS)}  # 0 = valid
OUT_OF_RANGE_POLICIES = ("reject", "raise")


@dataclass
class Samples:
    """All rows of all files as flat arrays, in file order (files in the order given).

    Attributes:
        file: int index into the list of tables, per row.
        row: 1-based data row in its file.
        ns: int64 UTC nanoseconds (NAT where the timestamp failed).
        tag: index into TagDictionary.names; -1 where the row has no tag.
        value: float64.
        reason: int8 reason code (0 = valid so far).
        ref: int64 context for the message: first row of a duplicate, latest earlier time.
    """

    file: np.ndarray
    row: np.ndarray
    ns: np.ndarray
    tag: np.ndarray
    value: np.ndarray
    reason: np.ndarray
    ref: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@dataclass
class ValidationResult:
    """What validate() hands on.

    Attributes:
        valid: valid samples, file order: timestamp (datetime64[ns, UTC]), tag (category over
            the dictionary's names), value (float64), run (int64 index into `runs`).
        rejects: rejects.csv rows: file, row, timestamp, tag, value, quality, reason.
        counts: rows_in, rows_valid, rows_rejected, rejected_by_reason (every reason, 0s kept).
        runs: the run table used (the given one, or the single run spanning the data).
        constant_tags: tags whose valid samples all have one value.
        warnings: sentences for the manifest (constant tags, tags without valid samples).
    """

    valid: pd.DataFrame
    rejects: pd.DataFrame
    counts: dict
    runs: pd.DataFrame
    constant_tags: list[str]
    warnings: list[str]


def check_tags(table: HistorianTable, dictionary: TagDictionary) -> np.ndarray:
    """Map the file's tag names to dictionary indices; an unknown tag is fatal.

    Args:
        table: one historian file.
        dictionary: the plant's tags.

    Returns:
        int64 array, one dictionary index per category of `table.frame["tag"]` (-1 for a
        category no row holds that is not in the dictionary).

    Raises:
        DataValidationError: naming the file, the first row of the unknown tag, the tag, and
            the dictionary tags spelled like it.
    """
    categories = list(table.frame["tag"].cat.categories)
    codes = table.frame["tag"].cat.codes.to_numpy()
    # Only tags some row holds: a Parquet category no row uses, or the empty column a
    # trailing comma makes in a wide CSV, is not in the export.
    for code in np.unique(codes[codes >= 0]):
        name = categories[code]
        if name not in dictionary:
            first = int(np.argmax(codes == code))
            row = int(table.frame["row"].iloc[first])
            close = dictionary.close_matches(name)
            hint = f"; did you mean {close}?" if close else ""
            raise DataValidationError(
                f"{table.file} row {row} tag {name!r}: unknown tag, not in the tag "
                f"dictionary ({len(dictionary)} tags){hint}"
            )
    return np.array(
        [dictionary.names.index(name) if name in dictionary else -1 for name in categories],
        dtype=np.int64,
    )


def check_units(claims: list[UnitClaim], dictionary: TagDictionary) -> None:
    """Compare the units an export states with the dictionary's; any difference is fatal.

    Raises:
        DataValidationError: naming file, row (or header column), tag, expected and found
            unit; a claim about a tag the dictionary does not know is an unknown tag.
    """
    for claim in claims:
        if claim.tag not in dictionary:
            close = dictionary.close_matches(claim.tag)
            raise DataValidationError(
                f"{claim.file} {claim.where} tag {claim.tag!r}: unknown tag, not in the tag "
                f"dictionary" + (f"; did you mean {close}?" if close else "")
            )
        expected = dictionary[claim.tag].unit
        # the same unit in other code points (micro sign U+00B5 and Greek mu U+03BC) is
        # the same unit: the refusal printed two strings that looked alike
        if unicodedata.normalize("NFKC", claim.unit.strip()) != unicodedata.normalize(
            "NFKC", expected
        ):
            raise DataValidationError(
                f"{claim.file} {claim.where} tag {claim.tag}: unit {claim.unit!r} but the tag "
                f"dictionary says {expected!r}; convert the export, or fix the dictionary"
            )


def validate(
    tables: list[HistorianTable],
    dictionary: TagDictionary,
    *,
    runs: pd.DataFrame | None = None,
    good_quality: tuple[str, ...] = ("Good",),
    out_of_range: str = "reject",
    max_bad_timestamp_fraction: float = 0.01,
) -> ValidationResult:
    """Validate historian frames row by row and account for every row.

    Args:
        tables: the historian files, in the order their rows count as "file order".
        dictionary: the plant's tags (roles, units, ranges).
        runs: run table from runs.read_runs; None makes the whole export one run.
        good_quality: quality strings meaning a good sample (an empty quality is good too).
        out_of_range: "reject" (row to rejects.csv) or "raise".
        max_bad_timestamp_fraction: above this fraction of unparseable timestamps in a
            file, the file is not trusted and validation raises.

    Returns:
        ValidationResult with rows_in == rows_valid + rows_rejected.

    Raises:
        DataValidationError: unknown tag, too many unparseable timestamps, or an
            out-of-range value when out_of_range="raise"; each names file, row and tag.
        RowAccountingError: the counts do not add up (a bug, never the input's fault).
    """
    samples = _samples(tables, dictionary, good_quality)
    _check_timestamp_fraction(samples, tables, max_bad_timestamp_fraction)
    _mark_duplicates(samples)
    _mark_backwards(samples)
    _check_backwards_fraction(samples, tables)
    _mark_out_of_range(samples, dictionary, tables, out_of_range)
    if runs is None:
        ok = samples.reason == 0
        # The run spans the first to the last valid sample, so the grid starts at the first.
        runs = single_run(
            int(samples.ns[ok].min()) if ok.any() else 0,
            int(samples.ns[ok].max()) if ok.any() else 0,
        )
    run = assign_runs(samples.ns, runs)
    samples.reason[(samples.reason == 0) & (run < 0)] = CODE["outside_runs"]
    ok = samples.reason == 0
    valid = pd.DataFrame(
        {
            "timestamp": pd.Series(samples.ns[ok].view("M8[ns]")).dt.tz_localize("UTC"),
            "tag": pd.Categorical.from_codes(samples.tag[ok], categories=dictionary.names),
            "value": samples.value[ok],
            "run": run[ok],
        }
    )
    rejects = build_rejects(samples, tables, dictionary, REASONS)
    counts = _counts(samples, len(valid), len(rejects))
    constant, warnings = _tag_warnings(valid, dictionary)
    return ValidationResult(valid, rejects, counts, runs, constant, warnings)


def _samples(tables, dictionary, good_quality) -> Samples:
    """Flatten the files into Samples and mark the checks that need only the row itself."""
    parts = []
    for i, table in enumerate(tables):
        f = table.frame
        to_dict = check_tags(table, dictionary)
        codes = f["tag"].cat.codes.to_numpy().astype(np.int64)
        tag = np.where(codes >= 0, to_dict[np.clip(codes, 0, None)] if len(to_dict) else -1, -1)
        quality = f["quality"]
        # "Good " from a fixed-width export is Good: the padding is layout, not a quality;
        # a quality of padding alone is an empty one, which is good
        categories = np.asarray([str(c).strip() for c in quality.cat.categories], dtype=object)
        good_cat = np.isin(categories, list(good_quality)) | (categories == "")
        qcodes = quality.cat.codes.to_numpy()
        good = (qcodes < 0) | (good_cat[np.clip(qcodes, 0, None)] if len(good_cat) else False)
        value = f["value"].to_numpy(dtype=np.float64)
        # np.select takes the first true condition: the order of REASONS.
        reason = np.select(
            [
                f["timestamp_error"].cat.codes.to_numpy() >= 0,
                tag < 0,
                ~good,
                f["value_text"].notna().to_numpy(),
                np.isnan(value),
            ],
            [
                f["timestamp_error"].cat.codes.to_numpy() + 1,
                CODE["missing_tag"],
                CODE["bad_quality"],
                CODE["non_numeric_value"],
                CODE["missing_value"],
            ],
            0,
        ).astype(np.int8)
        ns = pd.DatetimeIndex(f["timestamp"]).as_unit("ns").asi8
        parts.append(
            (np.full(len(f), i, dtype=np.int32), f["row"].to_numpy(), ns, tag, value, reason)
        )
    # one file (the usual case) needs no copy
    cols = [c[0] if len(c) == 1 else np.concatenate(c) for c in zip(*parts, strict=True)]
    if not parts:
        types = (np.int32, np.int64, np.int64, np.int64, np.float64, np.int8)
        cols = [np.zeros(0, dtype=t) for t in types]
    return Samples(*cols, ref=np.zeros(len(cols[0]), dtype=np.int64))


def _check_timestamp_fraction(samples: Samples, tables, limit: float) -> None:
    """Too many unparseable timestamps means a wrong format or a broken file: fatal."""
    bad = samples.reason == CODE["unparseable_timestamp"]
    for i, table in enumerate(tables):
        in_file = samples.file == i
        n_bad = int(np.count_nonzero(bad & in_file))
        n = int(np.count_nonzero(in_file))
        if n and n_bad / n > limit:
            first = np.flatnonzero(bad & in_file)[:3]
            rows = ", ".join(str(r) for r in samples.row[first])
            text = table.frame["timestamp_text"].iloc[first[0] - np.flatnonzero(in_file)[0]]
            raise DataValidationError(
                f"{table.file}: {n_bad} of {n} rows ({n_bad / n:.1%}) have unparseable "
                f"timestamps, more than data.max_bad_timestamp_fraction={limit}; first at "
                f"row {rows} ({text!r}); check data.timestamp_format"
            )


def _mark_duplicates(s: Samples) -> None:
    """Same tag and timestamp twice: the first in file order stays, later ones are rejected."""
    cand = np.flatnonzero(s.reason == 0)
    order = np.lexsort((s.ns[cand], s.tag[cand]))  # stable: ties stay in file order
    sorted_idx = cand[order]
    tag, ns = s.tag[sorted_idx], s.ns[sorted_idx]
    dup = np.zeros(len(sorted_idx), dtype=bool)  # no candidates (every row bad): none
    dup[1:] = (tag[1:] == tag[:-1]) & (ns[1:] == ns[:-1])
    start = np.maximum.accumulate(np.where(dup, 0, np.arange(len(dup))))
    s.reason[sorted_idx[dup]] = CODE["duplicate_timestamp"]
    s.ref[sorted_idx[dup]] = sorted_idx[start[dup]]


def _mark_backwards(s: Samples) -> None:
    """A timestamp earlier than one already seen for the same tag in the same file."""
    cand = np.flatnonzero(s.reason == 0)
    frame = pd.DataFrame(
        {"key": s.file[cand].astype(np.int64) * (1 << 32) + s.tag[cand], "ns": s.ns[cand]}
    )
    latest = frame.groupby("key", sort=False)["ns"].cummax()
    previous = latest.groupby(frame["key"], sort=False).shift(1)
    back = (frame["ns"] < previous).to_numpy()
    s.reason[cand[back]] = CODE["time_backwards"]
    s.ref[cand[back]] = previous.to_numpy()[back].astype(np.int64)


def _check_backwards_fraction(s: Samples, tables) -> None:
    """A file where most samples run backwards is one exported newest first: every sample
    but each tag's first would be rejected as time_backwards. Fatal, saying so."""
    back = s.reason == CODE["time_backwards"]
    for i, table in enumerate(tables):
        in_file = s.file == i
        n_back = int(np.count_nonzero(back & in_file))
        n = int(np.count_nonzero(in_file & ((s.reason == 0) | back)))
        if n_back and n_back > n / 2:
            first = int(s.row[np.flatnonzero(back & in_file)[0]])
            raise DataValidationError(
                f"{table.file}: {n_back} of {n} samples are earlier than one before them of "
                f"the same tag (first at row {first}): the file runs newest first; export it "
                f"oldest first (ascending time)"
            )


def _mark_out_of_range(s: Samples, dictionary: TagDictionary, tables, policy: str) -> None:
    """Values outside the dictionary's [low, high] (bounds included as valid)."""
    specs = [dictionary[name] for name in dictionary.names]
    low = np.array([spec.range_low for spec in specs])
    high = np.array([spec.range_high for spec in specs])
    cand = np.flatnonzero(s.reason == 0)
    tag, value = s.tag[cand], s.value[cand]
    bad = cand[(value < low[tag]) | (value > high[tag]) | ~np.isfinite(value)]
    if bad.size and policy == "raise":
        i = bad[0]
        spec = specs[s.tag[i]]
        raise DataValidationError(
            f"{tables[s.file[i]].file} row {s.row[i]} tag {spec.name}: {float(s.value[i])!r} "
            f"{spec.unit} outside [{spec.range_low}, {spec.range_high}] {spec.unit}"
        )
    s.reason[bad] = CODE["out_of_range"]


def _counts(s: Samples, n_valid: int, n_rejected: int) -> dict:
    by_reason = np.bincount(s.reason, minlength=len(REASONS) + 1)
    counts = {
        "rows_in": int(len(s.reason)),
        "rows_valid": int(n_valid),
        "rows_rejected": int(n_rejected),
        "rejected_by_reason": {r: int(by_reason[CODE[r]]) for r in REASONS},
    }
    if counts["rows_in"] != counts["rows_valid"] + counts["rows_rejected"] or (
        sum(counts["rejected_by_reason"].values()) != counts["rows_rejected"]
    ):
        raise RowAccountingError(f"rows do not add up: {counts}")
    return counts


def _tag_warnings(valid: pd.DataFrame, dictionary: TagDictionary) -> tuple[list[str], list]:
    """Constant tags and tags without any valid sample, as manifest warnings."""
    stats = valid.groupby("tag", observed=False)["value"].agg(["min", "max", "count"])
    constant, warnings = [], []
    for name in dictionary.names:
        low, high, count = stats.loc[name, "min"], stats.loc[name, "max"], stats.loc[name, "count"]
        if count == 0:
            warnings.append(f"tag {name}: no valid sample in the export")
        elif low == high:
            constant.append(name)
            warnings.append(
                f"tag {name}: constant, all {int(count)} valid samples equal {float(high)!r}"
            )
    return constant, warnings
