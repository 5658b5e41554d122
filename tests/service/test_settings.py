"""Settings from HAT_* environment variables: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import DEFAULT_MODEL, Settings, SettingsError, settings_markdown, settings_rows

REPO = Path(__file__).resolve().parents[2]


def test_defaults():
    s = Settings.from_env({})
    assert s.index_root is None and s.model == DEFAULT_MODEL and s.model.endswith("models/demo")
    assert (s.host, s.port, s.device) == ("127.0.0.1", 8000, "cpu")
    assert (s.default_k, s.max_k, s.default_candidates, s.max_candidates) == (10, 100, 100, 1000)
    assert s.max_upload_bytes == 10 * 1024 * 1024 and s.max_query_chars == 1000
    assert s.admin_key is None and not s.admin_enabled and s.cors_origins == ()
    assert s.reload_interval == 2.0 and s.rerank_dtype == "float32" and s.threads is None


def test_every_variable_is_read():
    env = {
        "HAT_INDEX_ROOT": "/srv/index", "HAT_MODEL": "/models/x", "HAT_HOST": "0.0.0.0", "HAT_PORT": "9000",
        "HAT_ADMIN_KEY": " s3cret ", "HAT_DEVICE": "AUTO", "HAT_DEFAULT_K": "5", "HAT_MAX_K": "50",
        "HAT_DEFAULT_CANDIDATES": "60", "HAT_MAX_CANDIDATES": "500", "HAT_MAX_UPLOAD_BYTES": "1_000_000",
        "HAT_MAX_QUERY_CHARS": "200", "HAT_CORS_ORIGINS": "https://a.example, https://b.example,",
        "HAT_THREADS": "2", "HAT_RELOAD_INTERVAL": "0.5", "HAT_RERANK_DTYPE": "bfloat16",
        "HAT_MAX_IMAGE_PIXELS": "1000000", "HAT_WORKERS": "3", "HAT_RELOAD_GRACE": "1", "HAT_LOG_LEVEL": "DEBUG",
    }  # fmt: skip
    s = Settings.from_env(env)
    assert s.index_root == "/srv/index" and s.model == "/models/x" and (s.host, s.port) == ("0.0.0.0", 9000)
    assert s.admin_key == " s3cret " and s.admin_enabled  # a key is kept exactly
    assert s.device == "auto" and s.rerank_dtype == "bfloat16" and s.log_level == "debug"
    assert (s.default_k, s.max_k, s.default_candidates, s.max_candidates) == (5, 50, 60, 500)
    assert (s.max_upload_bytes, s.max_query_chars, s.max_image_pixels) == (1_000_000, 200, 1_000_000)
    assert s.cors_origins == ("https://a.example", "https://b.example")
    assert (s.threads, s.workers, s.reload_interval, s.reload_grace) == (2, 3, 0.5, 1.0)
    assert "s3cret" not in repr(s)


def test_empty_means_unset():
    s = Settings.from_env({"HAT_ADMIN_KEY": "", "HAT_PORT": " ", "HAT_RELOAD_INTERVAL": ""})
    assert s.admin_key is None and s.port == 8000 and s.reload_interval == 2.0


def test_reload_interval_zero_turns_polling_off():
    assert Settings.from_env({"HAT_RELOAD_INTERVAL": "0"}).reload_interval == 0


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"HAT_PORT": "eighty"}, "HAT_PORT"),
        ({"HAT_PORT": "70000"}, "HAT_PORT"),
        ({"HAT_MAX_K": "0"}, "HAT_MAX_K"),
        ({"HAT_DEFAULT_K": "-3"}, "HAT_DEFAULT_K"),
        ({"HAT_DEFAULT_K": "200"}, "HAT_DEFAULT_K"),
        ({"HAT_DEFAULT_CANDIDATES": "2000"}, "HAT_DEFAULT_CANDIDATES"),
        ({"HAT_MAX_K": "2000"}, "HAT_MAX_K"),
        ({"HAT_DEVICE": "tpu"}, "HAT_DEVICE"),
        ({"HAT_RERANK_DTYPE": "int4"}, "HAT_RERANK_DTYPE"),
        ({"HAT_RELOAD_INTERVAL": "soon"}, "HAT_RELOAD_INTERVAL"),
        ({"HAT_RELOAD_INTERVAL": "-1"}, "HAT_RELOAD_INTERVAL"),
        ({"HAT_RELOAD_INTERVAL": "nan"}, "HAT_RELOAD_INTERVAL"),
        ({"HAT_THREADS": "0"}, "HAT_THREADS"),
        ({"HAT_MAX_UPLOAD_BYTES": "10MB"}, "HAT_MAX_UPLOAD_BYTES"),
        ({"HAT_LOG_LEVEL": "loud"}, "HAT_LOG_LEVEL"),
    ],
)
def test_invalid_values_name_the_variable(env, names):
    with pytest.raises(SettingsError, match=names):
        Settings.from_env(env)


def test_cuda_without_cuda_is_a_settings_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SettingsError, match="HAT_DEVICE"):
        Settings(device="cuda").resolved_device()
    assert Settings(device="auto").resolved_device() == "cpu"


def test_cli_refuses_invalid_environment_at_start():
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAT_")}
    env["HAT_MAX_K"] = "lots"
    proc = subprocess.run(
        [sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "HAT_MAX_K must be an integer" in proc.stderr and "Traceback" not in proc.stderr


def test_only_from_env_reads_the_environment(monkeypatch):
    monkeypatch.setenv("HAT_PORT", "9999")
    assert Settings().port == 8000 and Settings.from_env().port == 9999


def test_docs_hold_the_generated_settings_table():
    """docs/service.md's table is the one generated from the model (python -m service --settings-markdown)."""
    text = (REPO / "docs" / "service.md").read_text()
    start = text.index("| variable | type | default | description |")
    end = text.index("<!-- end of the settings table -->")
    assert text[start:end] == settings_markdown(), "regenerate it: python -m service --settings-markdown"
    assert [row[0] for row in settings_rows()] == [f"HAT_{name.upper()}" for name in Settings.model_fields]


def test_cli_help_lists_every_setting():
    proc = subprocess.run(
        [sys.executable, "-m", "service", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m service")
    for name, kind, _, _ in settings_rows():
        assert f"  {name}  ({kind.replace('`', '')}; default " in proc.stdout
    assert "HAT_PORT  (integer 0–65535; default 8000)" in proc.stdout
