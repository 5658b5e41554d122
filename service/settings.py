"""Service settings: one pydantic-settings model, read from ``HAT_*`` environment variables by
:meth:`Settings.from_env`.

Each setting is declared once: its type, limits, default and description are the field's. The environment
variable is ``HAT_`` + the field name in capitals. Every value is checked when the settings are built; a bad
value raises :class:`SettingsError` naming the variable, so ``python -m service`` stops at start-up with a clear
message instead of failing on a request. :func:`settings_rows` is the table of them, printed by
``python -m service --help`` and copied into docs/service.md (a test keeps the two equal).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = str(REPO / "models" / "demo")
Device = Literal["cpu", "cuda", "auto"]
RerankDtype = Literal["float32", "bfloat16", "float16"]  # the torch dtypes of these names (service/search.py)
TextPrecision = Literal["auto", "float32", "bfloat16", "int8", "onnx"]  # model.precision
LogLevel = Literal["debug", "info", "warning", "error"]
ENV_PREFIX = "HAT_"


class SettingsError(ValueError):
    """An environment variable (or a ``Settings`` field) holds a value the service cannot use."""


class Settings(BaseSettings):
    """Configuration of the search service.

    ``Settings(**values)`` takes the values given and the defaults for the others; it never reads the
    environment (so tests and embedding code get exactly what they ask for). :meth:`from_env` reads the
    ``HAT_*`` variables. Instances are immutable.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="forbid")

    index_root: str | None = Field(
        None,
        description="The builder's output root (`current`, `versions/`, `segments/`); a single version directory "
        "also works (then no hot reload). Unset: alive but never ready.",
    )
    model: str = Field(
        DEFAULT_MODEL,
        description="Anything `model.load_model` accepts (the authors' `.ckpt` or a project model directory).",
    )
    host: str = Field("127.0.0.1", description="The address `python -m service` listens on.")
    port: int = Field(8000, ge=0, le=65535, description="The port `python -m service` listens on.")
    admin_key: str | None = Field(
        None,
        repr=False,
        description="Enables `POST /admin/reload` (header `X-Admin-Key`); unset or empty turns it off (404). "
        "Kept exactly as given, spaces included.",
    )
    device: Device = Field(
        "cpu", description="Where the model runs; `auto` = CUDA when present. `cuda` without CUDA stops the start-up."
    )
    default_k: int = Field(10, ge=1, description="Results per search when the request gives no `k`.")
    max_k: int = Field(100, ge=1, description="The largest `k` a request may ask for.")
    default_candidates: int = Field(
        100, ge=1, description="FAISS candidates re-ranked per search when the request gives no `candidates`."
    )
    max_candidates: int = Field(1000, ge=1, description="The largest `candidates` a request may ask for.")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="The largest image upload, in bytes (10 MiB).")
    max_image_pixels: int = Field(
        89_478_485,
        ge=1,
        description="The largest image in pixels, read from its header before decoding (decompression bombs). "
        "Pillow refuses images above twice its own limit (~179 Mpixel) whatever this says.",
    )
    max_query_chars: int = Field(1000, ge=1, description="The longest text query, in characters.")
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Comma-separated origins allowed by CORS (`GET`, `POST`, header `Content-Type`); "
        "empty = no CORS headers at all.",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="Torch intra-op threads; unset = CPU cores ÷ `HAT_WORKERS` (more oversubscribes the cores: "
        "measured ~0.8 s a query instead of ~25 ms next to a busy process).",
    )
    workers: int = Field(
        2, ge=1, description="Searches computed at the same time (worker threads); more requests wait their turn."
    )
    processes: int = Field(
        0,
        ge=0,
        le=64,
        description="Search processes: `0` computes searches in `HAT_WORKERS` threads of the server's process; N > 0 "
        "in N worker processes instead, one search batch each at a time, each with its own copy of the model and "
        "`HAT_THREADS` (unset: CPU cores ÷ N) threads; CPU only. Threads of one process wait for each other's "
        "Python: with the demo model on 2 cores, 2 processes ran 1.5x the re-ranks/s of 2 threads, and served "
        "+31% requests/s at 32 clients, +2% at 8; a lone query is a little slower, and at HAT-base sizes there "
        "was no gain (docs/benchmarks.md, Search processes). `HAT_WORKERS`, `HAT_SPLIT_RERANK` and "
        "`HAT_WIDE_ENCODE` are for threads and unused with processes; `python -m service.cluster` refuses it.",
    )
    split_rerank: bool = Field(
        True,
        description="While fewer searches run than `HAT_WORKERS`, a query's re-rank splits its candidates over the "
        "idle workers (helper threads; the same scores) when each part keeps at least 200,000 query-candidate token "
        "pairs (100 HAT-base candidates split, 100 demo ones do not). `false`: each re-rank runs on its own worker "
        "only.",
    )
    wide_encode: bool = Field(
        True,
        description="A text batch that is every search request the service holds, with another worker idle, is "
        "encoded on the idle workers' threads too: the `onnx` query encoder gets a second ONNX Runtime session with "
        "`HAT_THREADS` x `HAT_WORKERS` threads, kept when it times more than 10% faster at start-up (its own copy of "
        "the text encoder's weights: ~440 MiB more for BERT-base; one client's p50 at HAT-base sizes 90.7-94.5 "
        "against 101.5-112.6 ms, docs/benchmarks.md). Other query precisions are unaffected. `false`: no second "
        "session.",
    )
    max_batch: int = Field(
        8,
        ge=1,
        le=256,
        description="Most text queries encoded together in one forward (dynamic batching; 1 turns it off).",
    )
    batch_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="How long the first query of a batch waits for others to join, in ms. Queries that wait for "
        "a busy worker join anyway, which under load gives the same batches without delaying a query alone "
        "(measured: docs/benchmarks.md, Dynamic batching).",
    )
    reload_interval: float = Field(
        2.0,
        ge=0,
        allow_inf_nan=False,
        description="Seconds between checks of the index root's `current`; `0` = no polling "
        "(`POST /admin/reload` still works).",
    )
    reload_grace: float = Field(
        10.0, ge=0, allow_inf_nan=False, description="Seconds a replaced index stays open for the requests using it."
    )
    rerank_dtype: RerankDtype = Field(
        "float32",
        description="Precision of the re-rank matrix products. `bfloat16` is faster on CPU (re-rank figures in "
        "`docs/benchmarks.md`) and agrees with `float32` within 3e-2 in the tests.",
    )
    text_precision: TextPrecision = Field(
        "auto",
        description="Precision of the query text encoder on CPU (`model.precision`): `auto` times `float32`, "
        "`bfloat16` (bfloat16 linear layers), `int8` (dynamically quantised linear layers) and `onnx` (the float32 "
        "encoder run by ONNX Runtime) on the loaded model at "
        "start-up and keeps the fastest whose features stay within 0.8% of float32's, or the most exact one "
        "within 20% of its time (logged; the bound keeps ≥ 99.5% of the final top 10 on the demo model: "
        "`docs/benchmarks.md`, Query encoding). Applies when the "
        "service loads the model itself; on a GPU the model runs as loaded.",
    )
    log_level: LogLevel = Field("info", description="Log level of the service and of uvicorn.")
    shard_timeout: float = Field(
        5.0,
        gt=0,
        allow_inf_nan=False,
        description="`python -m service.cluster`: seconds a search waits for a shard's answer (retries and hedged "
        "calls included) before answering without it.",
    )
    shard_hedge: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="`python -m service.cluster`: seconds after which a shard call still unanswered is sent once "
        "more (to another replica when there is one), the first answer winning: a stalled replica costs a "
        "search this long, not the whole timeout.",
    )
    partial_results: bool = Field(
        True,
        description="`python -m service.cluster`: a shard with no live replica gives `200` with `\"partial\": "
        "true` and `\"missing_shards\"`; `false` answers `503` instead.",
    )

    def __init__(self, **values: Any) -> None:
        """Checks every value; raises :class:`SettingsError` naming the variable of the first bad one."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(_describe(exc)) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The constructor's values only: the environment is read by :meth:`from_env`, never implicitly."""
        return (init_settings,)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``HAT_*`` variables (``os.environ`` by default); unset or blank = the default."""
        return cls(**_EnvironSource(cls, os.environ if environ is None else environ)())

    @field_validator("device", "rerank_dtype", "text_precision", "log_level", mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(origin.strip() for origin in value.split(",") if origin.strip())
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_k > self.max_k:
            raise SettingsError(f"HAT_DEFAULT_K ({self.default_k}) is above HAT_MAX_K ({self.max_k})")
        if self.default_candidates > self.max_candidates:
            raise SettingsError(
                f"HAT_DEFAULT_CANDIDATES ({self.default_candidates}) is above "
                f"HAT_MAX_CANDIDATES ({self.max_candidates})"
            )
        if self.max_k > self.max_candidates:
            raise SettingsError(f"HAT_MAX_K ({self.max_k}) is above HAT_MAX_CANDIDATES ({self.max_candidates})")
        if self.processes and self.device == "cuda":
            raise SettingsError("HAT_PROCESSES is for the CPU; with HAT_DEVICE=cuda leave it at 0 (threads)")
        if self.admin_key is not None and not self.admin_key.strip():
            raise SettingsError("admin_key is empty; use None to turn the admin endpoints off")
        return self

    @property
    def search_slots(self) -> int:
        """Searches computed at the same time: ``HAT_PROCESSES`` when set, else ``HAT_WORKERS``."""
        return self.processes or self.workers

    def torch_threads(self, cores: int | None) -> int:
        """Torch threads of each search thread or process: ``HAT_THREADS``, else the cores shared by the
        concurrent searches (measured: 2 searches x 2 threads on 2 cores collapse to ~0.8 s a query next to a
        busy neighbour process, 1 thread each stays at ~25 ms)."""
        return self.threads or max(1, (cores or 1) // self.search_slots)

    @property
    def admin_enabled(self) -> bool:
        """Whether ``POST /admin/reload`` is on (a key is set)."""
        return self.admin_key is not None

    def resolved_device(self) -> str:
        """``cpu`` or ``cuda`` (``model.resolve_device``); raises ``SettingsError`` for CUDA on a machine without."""
        from model import DeviceError, resolve_device

        try:
            return resolve_device(self.device)
        except DeviceError as exc:
            raise SettingsError(f"HAT_DEVICE={self.device}: {exc}") from None


class _EnvironSource(EnvSettingsSource):
    """pydantic-settings' environment source (``HAT_`` prefix, names in any case) over a given mapping.

    Blank values are left out: unset and empty mean the same (compose files often pass empty variables). The
    others are stripped of outer whitespace, but for the admin key, kept exactly (its spaces are part of it).
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls, case_sensitive=False)
        keep_spaces = env_name("admin_key")
        self.env_vars = {
            name.lower(): raw if name.upper() == keep_spaces else raw.strip()
            for name, raw in environ.items()
            if name.upper().startswith(ENV_PREFIX) and raw.strip()
        }


def env_name(field_name: str) -> str:
    """``max_k`` -> ``HAT_MAX_K``."""
    return f"{ENV_PREFIX}{field_name.upper()}"


def _describe(exc: ValidationError) -> str:
    """The problems of ``exc``, each naming its environment variable (``; `` between them)."""
    messages = []
    for err in exc.errors(include_url=False):
        name = env_name(str(err["loc"][0])) if err["loc"] else "settings"
        got, ctx = err.get("input"), err.get("ctx") or {}
        kind = err["type"]
        if isinstance(ctx.get("error"), SettingsError):
            message = str(ctx["error"])
        elif kind == "int_parsing":
            message = f"{name} must be an integer, got {got!r}"
        elif kind == "float_parsing":
            message = f"{name} must be a number of seconds, got {got!r}"
        elif kind == "finite_number":
            message = f"{name} must be a finite number of seconds, got {got!r}"
        elif kind in ("greater_than_equal", "less_than_equal"):
            bound = f"at least {ctx['ge']}" if kind == "greater_than_equal" else f"at most {ctx['le']}"
            message = f"{name} must be {bound}, got {got}"
        elif kind == "literal_error":
            message = f"{name} must be one of {ctx['expected']}, got {got!r}"
        elif kind == "extra_forbidden":
            message = f"{name}: no such setting"
        else:
            message = f"{name}: {err['msg']}"
        messages.append(message)
    return "; ".join(messages)


# ------------------------------------------------------------------------------------------------ the table


def _type_text(field: FieldInfo) -> str:
    """What a variable holds, in words: ``integer 0–65535``, ``one of `cpu`, `cuda`, `auto```."""
    annotation = field.annotation
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(f"`{choice}`" for choice in get_args(annotation))
    if NoDecode in field.metadata:
        return "comma-separated list"
    if bool in _members(annotation):
        return "`true` or `false`"
    base = {int: "integer", float: "number"}.get(next((t for t in (int, float) if t in _members(annotation)), None))
    if base is None:
        return "string"
    low = next((m.ge for m in field.metadata if isinstance(m, annotated_types.Ge)), None)
    high = next((m.le for m in field.metadata if isinstance(m, annotated_types.Le)), None)
    above = next((m.gt for m in field.metadata if isinstance(m, annotated_types.Gt)), None)
    if low is not None and high is not None:
        return f"{base} {low}–{high}"
    if above is not None:
        return f"{base} > {above}"
    return f"{base} ≥ {low}" if low is not None else base


def _members(annotation: Any) -> tuple[Any, ...]:
    return get_args(annotation) or (annotation,)


def _default_text(value: Any) -> str:
    if value is None:
        return "unset"
    if value == ():
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str) and value.startswith(str(REPO) + os.sep):
        return f"`{Path(value).relative_to(REPO)}` of the repository"
    return f"`{value}`"


def settings_rows() -> list[tuple[str, str, str, str]]:
    """``(variable, type, default, description)`` of every setting, in declaration order."""
    return [
        (env_name(name), _type_text(field), _default_text(field.default), field.description or "")
        for name, field in Settings.model_fields.items()
    ]


def settings_markdown() -> str:
    """The settings table in Markdown (docs/service.md holds a copy; ``python -m service --settings-markdown``)."""
    lines = ["| variable | type | default | description |", "|---|---|---|---|"]
    for row in settings_rows():
        cells = [cell.replace("|", "\\|") for cell in row]
        lines.append(f"| `{cells[0]}` | {cells[1]} | {cells[2]} | {cells[3]} |")
    return "\n".join(lines) + "\n"
