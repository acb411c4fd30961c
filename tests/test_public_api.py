"""The public API is what ``semroute_stream.__all__`` lists, and nothing private leaks."""

from __future__ import annotations

import inspect

import semroute_stream


def test_all_names_exist_and_are_sorted() -> None:
    names = semroute_stream.__all__
    assert names == sorted(names)
    for name in names:
        assert hasattr(semroute_stream, name), name


def test_public_names_are_exactly_all() -> None:
    public = {
        name
        for name, value in vars(semroute_stream).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(semroute_stream.__all__) - {"__version__"}


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
