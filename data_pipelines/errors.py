"""The exceptions of the data pipeline: what a historian export or a data config can get wrong.

Every stage (historian -> validate -> align -> dataset) raises these, never a bare Exception,
so `twin prepare` can tell a bad file (the user fixes the export) from a bug of ours. They
subclass builtins, as STYLE.md asks, so `except ValueError` still catches them. data_pipelines
never imports hybrid_twin, so this family stands on its own rather than under TwinError.
"""

import math


class DataPipelineError(Exception):
    """Base of every error raised on purpose by data_pipelines."""


class DataValidationError(DataPipelineError, ValueError):
    """A historian export that cannot be trusted as a whole.

    Raised for file-level faults: an unreadable file, a missing timestamp column, a tag the
    dictionary does not know, a unit that differs from the dictionary's, too many unparseable
    timestamps, an inconsistent run table. The message names the file, and where it applies
    the 1-based data row and the tag. Row-level faults are not raised: they go to rejects.csv.
    """


class ConfigError(DataPipelineError, ValueError):
    """A `data` config or tag dictionary that is malformed: unknown key, bad value, bad role."""


class RowAccountingError(DataPipelineError, RuntimeError):
    """Rows in != rows valid + rows rejected: a row vanished or was counted twice.

    This is a bug of ours, never of the input; it is raised instead of asserted so that it
    also fires under `python -O`.
    """


def config_number(value: object, where: str) -> float:
    """A number from a data config or the tag dictionary (a numeric string too, as YAML or a
    Hydra override may give one).

    Raises:
        ConfigError: anything else (`1 s`, `70%`, null, a list, true, NaN), naming `where`.
    """
    try:
        number = math.nan if isinstance(value, bool) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if math.isnan(number):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return number
