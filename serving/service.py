"""The parts of one running service, and how the twin's outputs become response bodies.

Data flow: `create_app` builds a `Service` (settings, twin store, schemas, sessions, batcher,
metrics, forecast thread) -> the routes read from it -> `result_body` / `session_body` turn
the twin's numbers into the JSON the schemas in serving/schemas.py describe. Non-finite
numbers are left as they are: the response encoder writes them as null.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import orjson
import torch
from fastapi.responses import Response

from serving.batcher import StepOutput, UpdateBatcher
from serving.metrics import ServiceMetrics
from serving.schemas import TagSchemas
from serving.sessions import Session, SessionRegistry
from serving.settings import ServeSettings
from serving.twin_store import TwinStore


class FastJSONResponse(Response):
    """JSON through orjson: several times quicker than json for float-heavy bodies; NaN and
    inf become null."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content)


@dataclass(eq=False)
class Service:
    settings: ServeSettings
    store: TwinStore
    schemas: TagSchemas
    registry: SessionRegistry
    batcher: UpdateBatcher
    metrics: ServiceMetrics
    forecast_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="twin-forecast"))
    ready: bool = False

    @property
    def state_names(self) -> list[str]:
        return list(self.store.current.metadata["state_names"])

    def result_body(self, output: StepOutput, timestamp, steps: int) -> dict:
        """One UpdateResult (schemas.py) from the twin's outputs for a row."""
        tags = self.schemas.measurement_tags
        top = sorted(range(len(tags)), key=lambda k: -output.contributions[k])
        top = [k for k in top[: self.settings.sessions.top_contributions]
               if output.contributions[k] > 0]  # fmt: skip
        return {
            "timestamp": timestamp,
            "steps": steps,
            "state": dict(zip(self.state_names, output.x, strict=True)),
            "predicted": dict(zip(tags, output.prediction, strict=True)),
            "residual": dict(zip(tags, output.residual, strict=True)),
            "t2": output.t2,
            "t2_limit": output.t2_limit,
            "ewma_stat": dict(zip(tags, output.ewma_stat, strict=True)),
            "alarm": output.alarm,
            "top_contributions": [{"tag": tags[k], "contribution": output.contributions[k]}
                                  for k in top],  # fmt: skip
            "solver_status": output.status,
        }

    def session_body(self, session: Session) -> dict:
        """One SessionInfo (schemas.py); call with the session's lock held."""
        x, P, *_ = self.registry.state_of(session)
        std = torch.diagonal(P[0]).clamp_min(0).sqrt()
        names = self.state_names
        return {
            "session_id": session.session_id,
            "line_id": session.line_id,
            "created_utc": session.created_utc,
            "last_timestamp": session.last_timestamp,
            "n_updates": session.n_updates,
            "model_version": session.model_version,
            "alarm": session.alarm,
            "state": dict(zip(names, x[0].tolist(), strict=True)),
            "state_std": dict(zip(names, std.tolist(), strict=True)),
            "last_result": session.last_result,
        }

    def model_body(self) -> dict:
        """One ModelInfo (schemas.py): what is served, in which format, and why that one."""
        twin = self.store.current
        return {"label": twin.label, "version": twin.version, "sha256": twin.sha256,
                "source": twin.source, "loaded_utc": twin.loaded_utc,
                "format": twin.format, "format_setting": self.store.setting, "file": twin.file,
                "skipped_formats": [{"format": f, "reason": r} for f, r in twin.skipped],
                "metadata": twin.metadata}  # fmt: skip
