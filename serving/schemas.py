"""Request and response schemas, generated from the served twin's metadata.json.

Data flow: `LoadedTwin.metadata` (tags, units, dt, past_steps) + `Limits` -> `TagSchemas`
(pydantic models with one field per tag, named by the tag, described with its unit, finite and
bounded, unknown tags forbidden) -> FastAPI validates every body against them and writes them
into the OpenAPI schema, with examples. Timestamp order and equal lengths across lines depend
on more than one field and are checked by the routes (serving/routes.py).
"""

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, create_model

from serving.settings import Limits
from serving.twin_formats import min_past_rows

LINE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
TIMESTAMP_YEARS = (1900, 2999)  # a plant's clock; near 9999 the grid arithmetic overflowed


# How far a row may lie ahead of the service's clock: a day covers any skew and any offset
# written wrong; a past window dated years ahead (a typo) made every later post a 409.
CLOCK_LEAD = timedelta(days=1)


def _plausible_year(stamp: datetime) -> datetime:
    low, high = TIMESTAMP_YEARS
    if not low <= stamp.astimezone(UTC).year <= high:
        raise ValueError(f"a timestamp in the years {low}-{high} (UTC), got {stamp.isoformat()}")
    now = datetime.now(UTC)
    if stamp > now + CLOCK_LEAD:
        clock = now.isoformat(timespec="seconds")
        raise ValueError(f"a timestamp at most a day after the service's clock ({clock}), got "
                         f"{stamp.isoformat()}")  # fmt: skip
    return stamp


Timestamp = Annotated[AwareDatetime, AfterValidator(_plausible_year)]
STRICT = ConfigDict(extra="forbid")


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="path of the offending field, e.g. "
                                 "['body', 'observations', 3, 'timestamp']")  # fmt: skip
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every 4xx body: what was wrong and where (FastAPI's shape, without echoing input)."""

    detail: list[ErrorItem]


class Contribution(BaseModel):
    tag: str
    contribution: float = Field(description="the tag's share of T^2 (reconstruction-based)")


class UpdateResult(BaseModel):
    """The twin's answer to one observation row."""

    timestamp: datetime
    steps: int = Field(description="grid steps run for this row (> 1 after a gap: the "
                       "missing rows are predicted with the inputs held)")  # fmt: skip
    state: dict[str, float | None] = Field(description="filtered state estimate x, by name")
    predicted: dict[str, float | None] = Field(
        description="one-step prediction of each measurement tag for this row, tag units")
    residual: dict[str, float | None] = Field(
        description="measurement - prediction where sampled, 0 where not")
    t2: float | None = Field(description="Hotelling T^2 of the standardised residuals")
    t2_limit: float | None = Field(description="its threshold (null: no tag sampled)")
    ewma_stat: dict[str, float | None] = Field(description="|EWMA| / normal RMS per tag")
    alarm: bool
    top_contributions: list[Contribution]
    solver_status: int = Field(description="0 = the integrator succeeded")


class ObservationResponse(BaseModel):
    session_id: str
    line_id: str
    model_version: str
    n_updates: int = Field(description="grid steps run by this session since it was created")
    results: list[UpdateResult]


class SessionSummary(BaseModel):
    session_id: str
    line_id: str
    alarm: bool
    last_timestamp: datetime
    n_updates: int


class SessionInfo(BaseModel):
    session_id: str
    line_id: str
    created_utc: datetime
    last_timestamp: datetime
    n_updates: int
    model_version: str
    alarm: bool
    state: dict[str, float | None]
    state_std: dict[str, float | None] = Field(description="sqrt(diag P) by state name")
    last_result: UpdateResult | None


class ForecastLineResult(BaseModel):
    predicted: list[dict[str, float | None]] = Field(
        description="one entry per future row: measurement tag -> value, tag units")


class ForecastResponse(BaseModel):
    model_version: str
    dt_s: float
    lines: list[ForecastLineResult]


class SkippedFormat(BaseModel):
    format: str
    reason: str


class ModelInfo(BaseModel):
    label: str
    version: str | None
    sha256: str = Field(description="digest of the file served")
    source: str
    loaded_utc: str
    format: Literal["torchscript", "export", "aoti"] = Field(
        description="the twin file's format running: TorchScript, torch.export program or "
        "AOTInductor-compiled")
    format_setting: Literal["auto", "torchscript", "export", "aoti"] = Field(
        description="the service's `format` setting")
    file: str = Field(description="the file served (for a models:/ URI, its artifact path)")
    skipped_formats: list[SkippedFormat] = Field(
        description="with format auto: the faster formats that did not load, and why")
    metadata: dict[str, Any]


class ReloadResponse(BaseModel):
    changed: bool
    previous: str
    current: ModelInfo


class Status(BaseModel):
    status: str
    model_version: str | None = None
    format: str | None = None


def _tag_model(name: str, tags: list[str], units: dict, value: Any, required: bool) -> type:
    fields = {}
    for k, tag in enumerate(tags):
        description = f"{tag} [{units.get(tag, '?')}]"
        if required:
            fields[f"f{k}"] = (value, Field(alias=tag, description=description))
        else:  # a measurement: as the detector was fitted on it (docs/serving.md)
            description += ("; the mean of its samples over the row's dt_s interval; null or "
                            "absent = not sampled")
            fields[f"f{k}"] = (value | None, Field(None, alias=tag, description=description))
    return create_model(name, __config__=STRICT, **fields)


class TagSchemas:
    """The pydantic models of one twin interface (tags fixed while the service runs).

    Args:
        metadata: the twin's metadata.json.
        limits: the request bounds (list lengths, |value|).
    """

    def __init__(self, metadata: dict, limits: Limits) -> None:
        self.input_tags = list(metadata["input_tags"])
        self.measurement_tags = list(metadata["measurement_tags"])
        self.dt_s = float(metadata["dt_s"])
        units = metadata["units"]
        bound = limits.max_abs_value
        # strict: a JSON true/false or "511.7" is no measurement (lax mode made false a 0.0);
        # a JSON integer is still a number, and null the only "not sampled"
        value = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-bound, le=bound)]
        self.Inputs = _tag_model("Inputs", self.input_tags, units, value, required=True)
        self.Measurements = _tag_model("Measurements", self.measurement_tags, units, value,
                                       required=False)  # fmt: skip
        inputs_type, measurements_type = self.Inputs, self.Measurements
        self.Observation = create_model(
            "Observation", __config__=STRICT,
            timestamp=(Timestamp, Field(description="the row's time, with a UTC offset")),
            inputs=(inputs_type, Field(description="every input and disturbance tag")),
            measurements=(measurements_type, Field(default_factory=measurements_type)),
        )  # fmt: skip
        self.PastRow = create_model(
            "PastRow", __config__=STRICT, inputs=(inputs_type, ...),
            measurements=(measurements_type, Field(default_factory=measurements_type)),
        )  # fmt: skip
        past_steps = int(metadata.get("past_steps", 2))
        examples = _Examples(self, max(past_steps, min_past_rows(metadata)))
        rows = Annotated[list[self.Observation], Field(min_length=1,
                                                       max_length=limits.max_rows_per_post)]
        self.ObservationBatch = create_model(
            "ObservationBatch", __config__=ConfigDict(
                extra="forbid", json_schema_extra={"examples": [examples.observations()]}),
            observations=(rows, Field(description="rows in time order, each after the "
                                      "session's last; a gap is bridged by predicted rows")),
        )  # fmt: skip
        min_past = min_past_rows(metadata)  # 2, or more if the PT2 programs need more
        past = Annotated[list[self.Observation], Field(min_length=min_past,
                                                       max_length=limits.max_past_rows)]
        self.SessionCreate = create_model(
            "SessionCreate", __config__=ConfigDict(
                extra="forbid", json_schema_extra={"examples": [examples.session()]}),
            line_id=(str, Field(pattern=LINE_ID_PATTERN, description="the plant line "
                                "monitored; one open session per line")),
            past=(past, Field(description=f"consecutive rows, one every dt_s = {self.dt_s} s, "
                              f"to estimate the initial state (the twin expects {past_steps})")),
        )  # fmt: skip
        lines_past = Annotated[list[self.PastRow], Field(min_length=min_past,
                                                         max_length=limits.max_past_rows)]
        future = Annotated[list[inputs_type], Field(min_length=1,
                                                    max_length=limits.max_forecast_steps)]
        self.ForecastLine = create_model(
            "ForecastLine", __config__=STRICT,
            past=(lines_past, Field(description="consecutive rows before the forecast")),
            future_inputs=(future, Field(description="inputs of the rows to forecast")),
        )  # fmt: skip
        lines = Annotated[list[self.ForecastLine], Field(min_length=1,
                                                         max_length=limits.max_forecast_lines)]
        self.ForecastRequest = create_model(
            "ForecastRequest", __config__=ConfigDict(
                extra="forbid", json_schema_extra={"examples": [examples.forecast()]}),
            lines=(lines, Field(description="lines forecast together; every line has the "
                                "same number of past rows and of future rows")),
        )  # fmt: skip


class _Examples:
    """Example bodies for the OpenAPI schema. The twin file carries no typical values, so every
    tag is 1.0: the examples show the shape, not an operating point."""

    def __init__(self, schemas: TagSchemas, past_rows: int) -> None:
        self.inputs = dict.fromkeys(schemas.input_tags, 1.0)
        self.measurements = dict.fromkeys(schemas.measurement_tags, 1.0)
        self.dt = timedelta(seconds=schemas.dt_s)
        self.start = datetime(2025, 3, 1, 6, 0, tzinfo=UTC)
        self.past_rows = past_rows

    def _row(self, k: int) -> dict:
        return {"timestamp": (self.start + k * self.dt).isoformat(), "inputs": self.inputs,
                "measurements": self.measurements}  # fmt: skip

    def session(self) -> dict:
        return {"line_id": "LINE-1", "past": [self._row(k) for k in range(self.past_rows)]}

    def observations(self) -> dict:
        return {"observations": [self._row(self.past_rows)]}

    def forecast(self) -> dict:
        past = [{"inputs": self.inputs, "measurements": self.measurements}] * self.past_rows
        return {"lines": [{"past": past, "future_inputs": [self.inputs] * 3}]}
