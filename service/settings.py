"""Service settings: one dataclass, read from ``HAT_*`` environment variables by :meth:`Settings.from_env`.

Every value is checked when the settings are built; a bad value raises :class:`SettingsError` naming the
variable, so ``python -m service`` stops at start-up with a clear message instead of failing on a request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = str(REPO / "models" / "demo")
DEVICES = ("cpu", "cuda", "auto")
RERANK_DTYPES = ("float32", "bfloat16", "float16")


class SettingsError(ValueError):
    """An environment variable (or a ``Settings`` field) holds a value the service cannot use."""


@dataclass(frozen=True)
class Settings:
    """Configuration of the search service (environment variable in brackets).

    Attributes:
        index_root: builder output root [HAT_INDEX_ROOT]; the service is not ready while it is unset.
        model: anything ``model.load_model`` accepts [HAT_MODEL]; default the bundled ``models/demo``.
        host, port: where ``python -m service`` listens [HAT_HOST, HAT_PORT].
        admin_key: enables ``POST /admin/reload`` when set [HAT_ADMIN_KEY].
        device: ``cpu``, ``cuda`` or ``auto`` [HAT_DEVICE].
        default_k, max_k: results per query [HAT_DEFAULT_K, HAT_MAX_K].
        default_candidates, max_candidates: first-stage candidates re-ranked [HAT_DEFAULT_CANDIDATES, ...].
        max_upload_bytes: largest accepted image upload [HAT_MAX_UPLOAD_BYTES].
        max_image_pixels: largest accepted image, in pixels, read from its header [HAT_MAX_IMAGE_PIXELS].
        max_query_chars: longest accepted text query [HAT_MAX_QUERY_CHARS].
        cors_origins: origins allowed by CORS; empty = no CORS headers at all [HAT_CORS_ORIGINS, comma list].
        threads: torch intra-op threads; None = CPU cores // workers [HAT_THREADS].
        workers: searches computed at the same time; the others wait their turn [HAT_WORKERS].
        reload_interval: seconds between checks of the index's ``current`` pointer; 0 = off [HAT_RELOAD_INTERVAL].
        reload_grace: seconds an index replaced by a reload stays open for requests still using it
            [HAT_RELOAD_GRACE].
        rerank_dtype: precision of the re-rank: ``float32``, ``bfloat16`` or ``float16`` [HAT_RERANK_DTYPE].
        log_level: ``debug``, ``info``, ``warning`` or ``error`` [HAT_LOG_LEVEL].
    """

    index_root: str | None = None
    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = 8000
    admin_key: str | None = field(default=None, repr=False)
    device: str = "cpu"
    default_k: int = 10
    max_k: int = 100
    default_candidates: int = 100
    max_candidates: int = 1000
    max_upload_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 89_478_485
    max_query_chars: int = 1000
    cors_origins: tuple[str, ...] = ()
    threads: int | None = None
    workers: int = 2
    reload_interval: float = 2.0
    reload_grace: float = 10.0
    rerank_dtype: str = "float32"
    log_level: str = "info"

    def __post_init__(self) -> None:
        self._check_ranges()
        if self.device not in DEVICES:
            raise SettingsError(f"HAT_DEVICE must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.rerank_dtype not in RERANK_DTYPES:
            allowed = ", ".join(RERANK_DTYPES)
            raise SettingsError(f"HAT_RERANK_DTYPE must be one of {allowed}, got {self.rerank_dtype!r}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise SettingsError(f"HAT_LOG_LEVEL must be debug, info, warning or error, got {self.log_level!r}")
        if self.default_k > self.max_k:
            raise SettingsError(f"HAT_DEFAULT_K ({self.default_k}) is above HAT_MAX_K ({self.max_k})")
        if self.default_candidates > self.max_candidates:
            raise SettingsError(
                f"HAT_DEFAULT_CANDIDATES ({self.default_candidates}) is above "
                f"HAT_MAX_CANDIDATES ({self.max_candidates})"
            )
        if self.max_k > self.max_candidates:
            raise SettingsError(f"HAT_MAX_K ({self.max_k}) is above HAT_MAX_CANDIDATES ({self.max_candidates})")
        if self.admin_key is not None and not self.admin_key.strip():
            raise SettingsError("admin_key is empty; use None to turn the admin endpoints off")

    def _check_ranges(self) -> None:
        minimum = {
            "port": 0,
            "default_k": 1,
            "max_k": 1,
            "default_candidates": 1,
            "max_candidates": 1,
            "max_upload_bytes": 1,
            "max_image_pixels": 1,
            "max_query_chars": 1,
            "threads": 1,
            "workers": 1,
            "reload_interval": 0,
            "reload_grace": 0,
        }
        for name, low in minimum.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise SettingsError(f"{env_name(name)} must be at least {low}, got {value}")
        if self.port > 65535:
            raise SettingsError(f"HAT_PORT must be at most 65535, got {self.port}")

    @property
    def admin_enabled(self) -> bool:
        return self.admin_key is not None

    def resolved_device(self) -> str:
        """``cpu`` or ``cuda``; ``auto`` picks CUDA when present. Raises ``SettingsError`` for absent CUDA."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SettingsError("HAT_DEVICE is 'cuda' but CUDA is not available on this machine (use cpu or auto)")
        return self.device

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``HAT_*`` variables (``os.environ`` by default); unset or empty = the default."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is None or not raw.strip():
                continue  # unset and empty mean the same (compose files often pass empty variables)
            values[f.name] = _parse(f.name, raw)
        return cls(**values)


def env_name(field_name: str) -> str:
    """``max_k`` -> ``HAT_MAX_K``."""
    return f"HAT_{field_name.upper()}"


_INTS = {
    "port",
    "default_k",
    "max_k",
    "default_candidates",
    "max_candidates",
    "max_upload_bytes",
    "max_image_pixels",
    "max_query_chars",
    "threads",
    "workers",
}
_FLOATS = {"reload_interval", "reload_grace"}
_LOWER = {"device", "rerank_dtype", "log_level"}


def _parse(name: str, raw: str):
    value = raw.strip()
    if name in _INTS:
        try:
            return int(value.replace("_", ""))
        except ValueError:
            raise SettingsError(f"{env_name(name)} must be an integer, got {raw!r}") from None
    if name in _FLOATS:
        try:
            number = float(value)
        except ValueError:
            raise SettingsError(f"{env_name(name)} must be a number of seconds, got {raw!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise SettingsError(f"{env_name(name)} must be a finite number of seconds, got {raw!r}")
        return number
    if name == "cors_origins":
        return tuple(o.strip() for o in value.split(",") if o.strip())
    if name in _LOWER:
        return value.lower()
    if name == "admin_key":
        return raw  # kept exactly: a key's spaces are part of it
    return value
