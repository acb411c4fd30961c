"""The public API is what ``semroute_stream.__all__`` lists, and nothing private leaks."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import semroute_stream


def test_all_names_exist_and_are_sorted() -> None:
    names = semroute_stream.__all__
    assert names == sorted(names)
    for name in names:
        assert hasattr(semroute_stream, name), name


def test_public_names_are_exactly_all() -> None:
    # dir(), not vars(): the service's names are lazy (PEP 562) and listed by __dir__.
    public = {
        name
        for name in dir(semroute_stream)
        if not name.startswith("_") and not inspect.ismodule(getattr(semroute_stream, name))
    }
    assert public == set(semroute_stream.__all__) - {"__version__"}


def test_unknown_names_still_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        getattr(semroute_stream, "no_such_name")  # noqa: B009


_LIGHT_IMPORT = """
import json, sys
import semroute_stream
heavy = ("aiokafka", "httpx", "prometheus_client")
on_import = [m for m in heavy if m in sys.modules]
router = semroute_stream.Router.from_file(sys.argv[1], cache=False)
decision = router("my card was charged twice")
after_router = [m for m in heavy if m in sys.modules]
settings = semroute_stream.Settings  # the lazy names still resolve, and load the service
print(json.dumps({
    "on_import": on_import,
    "after_router": after_router,
    "route": decision.route,
    "model": router.encoder.model_name,
    "settings": settings.__module__,
}))
"""


def test_import_is_light_and_from_file_needs_no_encoder(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "method: max\n"
        "routes:\n"
        "  - name: billing\n"
        "    utterances: [refund my payment, I was charged twice, my invoice is wrong]\n"
        "  - name: shipping\n"
        "    utterances: [where is my parcel, track my delivery, the package is late]\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-c", _LIGHT_IMPORT, str(routes)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["on_import"] == []
    assert seen["after_router"] == []
    assert seen["route"] == "billing"
    assert seen["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert seen["settings"] == "semroute_stream._service.settings"


def test_library_api_names_are_public() -> None:
    for name in ("Router", "RouteDecision", "import_routes"):
        assert name in semroute_stream.__all__, name
    assert callable(semroute_stream.Router.from_file)
    assert callable(semroute_stream.Router.route_batch)
    assert callable(semroute_stream.Router.aroute)


def test_exception_hierarchy() -> None:
    s = semroute_stream
    exc: type[Exception]
    for exc in (s.ConfigError, s.ModelError, s.InputError, s.LLMError):
        assert issubclass(exc, s.SemrouteError)
    for exc in (s.LLMRetryableError, s.LLMPermanentError, s.CircuitOpenError):
        assert issubclass(exc, s.LLMError)
    assert s.InputError("empty_text", "why").kind == "empty_text"


def test_errors_are_documented_in_one_docstring() -> None:
    from semroute_stream import _errors

    doc = _errors.__doc__ or ""
    for name in (
        "SemrouteError",
        "ConfigError",
        "ModelError",
        "InputError",
        "LLMError",
        "LLMRetryableError",
        "LLMPermanentError",
        "CircuitOpenError",
    ):
        assert name in doc, name
