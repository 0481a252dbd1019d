"""The control plane's REST API (ARCHITECTURE.md §3), on FastAPI. OpenAPI at `/docs`.

Routes hold no logic: each translates HTTP into one call of `ControlService` and its errors into
status codes (404 unknown run, 409 a request the run's state does not allow, 422 a bad request
naming each field by its path). Every mutating route depends on `require_token` whenever a token
is configured; tokens are compared in constant time and never logged. Bodies are limited in size
before they are parsed.

Requests are strict: an unknown body field, an undefined query parameter or a body sent to an
action that takes none is refused with 422, never ignored, so a malformed request cannot start,
stop or change a run as if it had been understood.
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, ValidationError, model_validator
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchard.config import ConfigError, RunConfig, apply_overrides, config_from_dict, load_config
from orchard.services.control.run_control import ControlConflict, RunState
from orchard.services.control.service import ControlService, RunNotFound, RunStatus, ScaleRefused

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_bearer = HTTPBearer(auto_error=False)


# ---------------------------------------------------------------------------------- request/response models
class StrictRequest(BaseModel):
    """A request body that refuses what it does not define, each unknown field named by its path.

    A field the API ignored silently would be a request half-understood: a misspelt `pasued`
    would start the run unpaused. Fields are strict as well: a value of another JSON type than the
    documented one (`"paused": "yes"` or `1`, `"version": "3"`) is a client's bug, and reading it
    as what it resembles would hide the bug behind a guess.
    """

    model_config = ConfigDict(extra="forbid")


#: Top-level fields of a RunConfig, recognised when a config is posted bare instead of under `config`.
RUN_CONFIG_FIELDS = frozenset(RunConfig.model_fields)


class CreateRunRequest(StrictRequest):
    """A run to create: a config mapping (the embedded demo when omitted) and `--set`-style overrides."""

    config: dict[str, Any] | None = Field(
        None, description="A RunConfig as JSON (the YAML file's content). Omitted: the embedded demo config."
    )
    overrides: list[Annotated[str, Field(max_length=4096, strict=True)]] = Field(
        default_factory=list, max_length=256, strict=True, description="`key.path=value` overrides applied on top."
    )
    paused: bool = Field(False, strict=True, description="Create the run paused: set up, then wait for resume.")

    @model_validator(mode="wrap")
    @classmethod
    def _config_goes_under_config(cls, data: Any, handler: ModelWrapValidatorHandler[CreateRunRequest]) -> Any:
        """A config posted bare (`{"model": ..., "rollout": ...}`) is refused saying where it belongs."""
        try:
            return handler(data)
        except ValidationError as error:
            raise _explain_misplaced_config(error) from None


def _explain_misplaced_config(error: ValidationError) -> ValidationError:
    """`error` with each unknown top-level field that is a RunConfig field explained as misplaced."""
    if not any(_is_misplaced_config(item) for item in error.errors()):
        return error
    details: list[InitErrorDetails] = []
    for item in error.errors():
        if _is_misplaced_config(item):
            name = item["loc"][0]
            kind = PydanticCustomError(
                "config_field_misplaced",
                "'{field}' is a field of the run config, not of the request: send the config under 'config', "
                'as {"config": {"{field}": ...}}',  # only {field} is substituted
                {"field": name},
            )
        else:  # kept as it was, message included
            kind = PydanticCustomError(item["type"], item["msg"], item.get("ctx"))
        details.append(InitErrorDetails(type=kind, loc=item["loc"], input=item["input"]))
    return ValidationError.from_exception_data(error.title, details)


def _is_misplaced_config(item: ErrorDetails) -> bool:
    return item["type"] == "extra_forbidden" and len(item["loc"]) == 1 and item["loc"][0] in RUN_CONFIG_FIELDS


class RunAccepted(BaseModel):
    id: str
    state: RunState


class WeightsRequest(StrictRequest):
    """A new policy version and where its weights are."""

    version: int = Field(
        ..., ge=0, strict=True, description="The new policy version; must exceed the last announced one."
    )
    location: str = Field(
        ..., min_length=1, max_length=4096, strict=True, description="Where the weights can be fetched."
    )


class WorkersRequest(StrictRequest):
    """How many rollout workers the run should have."""

    count: int = Field(
        ...,
        ge=1,
        strict=True,
        description="Rollout workers wanted, at least 1 and within the run's quota (cluster.max_rollout_workers,"
        " max_cpus, max_gpus); applied at the run's next step boundary.",
    )


class WorkersAccepted(BaseModel):
    id: str
    state: RunState
    requested: int
    rollout_workers: int = Field(..., description="Rollout workers now (the change follows at the next step boundary).")


class WeightsAccepted(BaseModel):
    id: str
    version: int
    state: RunState


class Health(BaseModel):
    status: str = "ok"


# ---------------------------------------------------------------------------------- nothing undefined is accepted
#: What a refused query parameter or body field is called in a 422, as pydantic calls an unknown field.
EXTRA_FORBIDDEN = "Extra inputs are not permitted"


async def refuse_query_parameters(request: Request) -> None:
    """No mutating route defines query parameters, so any sent is refused (422, `loc` query.<name>).

    Ignoring one would act on a request the caller meant differently: `stop?force=true` or
    `pause?run=other` would still stop or pause the run in the path.
    """
    errors = [
        {"type": "extra_forbidden", "loc": ("query", name), "msg": EXTRA_FORBIDDEN, "input": value}
        for name, value in request.query_params.multi_items()
    ]
    if errors:
        raise RequestValidationError(errors)


async def refuse_body(request: Request) -> None:
    """pause/resume/stop/checkpoint take no body: one that carries anything is refused (422).

    No body, `{}` and `null` carry nothing and are accepted (some clients always send one); an
    object's fields are refused each by its path (`loc` body.<field>), anything else as a whole.
    Otherwise `stop` with `{"checkpoint": false}` would stop the run as if the field meant something.
    """
    raw = await request.body()
    if not raw.strip():
        return
    try:
        body = json.loads(raw)
    except ValueError:
        body = raw.decode(errors="replace")[:200]
    if body is None or body == {}:
        return
    if isinstance(body, dict):
        errors = [
            {"type": "extra_forbidden", "loc": ("body", str(name)), "msg": EXTRA_FORBIDDEN, "input": value}
            for name, value in body.items()
        ]
    else:
        errors = [{"type": "body_not_expected", "loc": ("body",), "msg": "this action takes no body", "input": body}]
    raise RequestValidationError(errors, body=body)


# ---------------------------------------------------------------------------------- body size limit
class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with 413, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body larger than {self.max_bytes} bytes"},
            status_code=status.HTTP_413_CONTENT_TOO_LARGE,
        )
        await response({"type": "http"}, _no_receive, send)


class _BodyTooLarge(Exception):
    pass


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


# ---------------------------------------------------------------------------------- the app
def create_app(service: ControlService, *, token: str | None = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The control plane over `service`; mutating routes need `Authorization: Bearer <token>` when `token` is set."""
    app = FastAPI(
        title="Orchard control plane",
        summary="Start, pause, resume, stop and checkpoint RL runs; weight versions; Prometheus metrics.",
        version="1",
    )
    expected = token.encode() if token else None

    def require_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if expected is None:
            return
        given = credentials.credentials.encode() if credentials is not None else b""
        if not secrets.compare_digest(given, expected):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                headers={"WWW-Authenticate": "Bearer"},
            )

    # the token first: an unauthenticated caller learns nothing about what its request would have done
    mutating = [Depends(require_token), Depends(refuse_query_parameters)]
    bodiless = [*mutating, Depends(refuse_body)]

    @app.exception_handler(RunNotFound)
    async def _not_found(request: Request, error: RunNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=status.HTTP_404_NOT_FOUND)

    @app.exception_handler(ControlConflict)
    async def _conflict(request: Request, error: ControlConflict) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=status.HTTP_409_CONFLICT)

    @app.exception_handler(ScaleRefused)
    async def _scale_refused(request: Request, error: ScaleRefused) -> JSONResponse:
        detail = [{"loc": ["body", "count"], "field": "count", "msg": str(error), "type": "quota"}]
        return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(ConfigError)
    async def _bad_config(request: Request, error: ConfigError) -> JSONResponse:
        detail = [
            {"loc": ["body", "config", *field.split(".")], "field": field, "msg": message, "type": "config"}
            for field, message in error.problems
        ]
        return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> Health:
        return Health()

    @app.get("/metrics", response_class=Response, tags=["service"], responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        # served on the event loop while a rendering is fresh; rendering happens in a worker thread
        body = service.fresh_metrics()
        if body is None:
            body = await run_in_threadpool(service.render_metrics)
        return Response(body, media_type=PROMETHEUS_CONTENT_TYPE)

    @app.post(
        "/v1/runs",
        response_model=RunAccepted,
        status_code=status.HTTP_201_CREATED,
        dependencies=mutating,
        tags=["runs"],
        responses={401: {}, 409: {}, 422: {}},
    )
    def create_run(request: CreateRunRequest) -> RunAccepted:
        config = _config_of(request)
        handle = service.create_run(config, paused=request.paused)
        return RunAccepted(id=handle.id, state=handle.control.state)

    @app.get("/v1/runs", response_model=list[RunStatus], tags=["runs"])
    def list_runs() -> list[RunStatus]:
        return [run.status() for run in service.runs()]

    @app.get("/v1/runs/{run_id}", response_model=RunStatus, tags=["runs"], responses={404: {}})
    async def get_run(run_id: str) -> Response:
        # the JSON of `RunStatus`, serialised once for every poller (`RunHandle.status_json`): a fresh
        # one is served on the event loop, so a crowd of pollers does not become a crowd of threads
        # contending with the run's own for the GIL; a new one is built in a worker thread (it may
        # wait on the buffer)
        handle = service.get(run_id)
        body = handle.fresh_status_json()
        if body is None:
            body = await run_in_threadpool(handle.status_json)
        return Response(body, media_type="application/json")

    def action(name: str, do: Any) -> None:
        def route(run_id: str) -> RunAccepted:
            return RunAccepted(id=run_id, state=do(run_id))

        route.__name__ = f"{name}_run"
        app.post(
            f"/v1/runs/{{run_id}}/{name}",
            response_model=RunAccepted,
            status_code=status.HTTP_202_ACCEPTED,
            dependencies=bodiless,
            tags=["runs"],
            summary=f"{name.capitalize()} a run",
            responses={401: {}, 404: {}, 409: {}, 422: {}},
        )(route)

    action("pause", service.pause)
    action("resume", service.resume)
    action("stop", service.stop)
    action("checkpoint", service.checkpoint)

    @app.post(
        "/v1/runs/{run_id}/weights",
        response_model=WeightsAccepted,
        status_code=status.HTTP_202_ACCEPTED,
        dependencies=mutating,
        tags=["runs"],
        responses={401: {}, 404: {}, 409: {}, 422: {}},
    )
    def announce_weights(run_id: str, request: WeightsRequest) -> WeightsAccepted:
        announcement = service.announce_weights(run_id, request.version, request.location)
        return WeightsAccepted(id=run_id, version=announcement.version, state=service.get(run_id).control.state)

    @app.post(
        "/v1/runs/{run_id}/workers",
        response_model=WorkersAccepted,
        status_code=status.HTTP_202_ACCEPTED,
        dependencies=mutating,
        tags=["runs"],
        summary="Change the number of a run's rollout workers",
        responses={401: {}, 404: {}, 409: {}, 422: {}},
    )
    def scale_run(run_id: str, request: WorkersRequest) -> WorkersAccepted:
        state = service.scale(run_id, request.count)
        workers = service.get(run_id).status().rollout_workers
        return WorkersAccepted(id=run_id, state=state, requested=request.count, rollout_workers=workers)

    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    return app


def _config_of(request: CreateRunRequest) -> RunConfig:
    if request.config is None:
        return load_config(None, request.overrides)
    return config_from_dict(apply_overrides(dict(request.config), request.overrides))
