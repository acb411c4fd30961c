"""A router: routes plus an encoder. Encodes the utterances once, then routes batches.

``compile_table`` turns a routes file and its utterances' embeddings into a ``RouteTable``.
For ``method: head`` and ``method: auto`` the route head is trained (or loaded from its cache)
when the router is built; ``auto`` is resolved there, once, deterministically: see
``resolve_routes``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from .decision import Decisions, HeadParams, RouteTable, decide
from .head_cache import HeadModel, default_head_cache_dir, head_cache_key, load_or_train_head
from .result import RouteDecision
from .schema import DecisionMethod, RoutesConfig, RoutesMethod, load_routes, routes_version
from .selection import AUTO_MIN_HELD_OUT, MethodChoice, choose_method, fold_of
from .text_encoder import DEFAULT_ENCODER, TextEncoder, default_encoder_factory
from .training import name_text

__all__ = [
    "AUTO_MAX_CELLS",
    "DEFAULT_ENCODER",
    "Resolution",
    "Router",
    "TextEncoder",
    "auto_without_head",
    "compile_table",
    "default_encoder_factory",
    "head_model_key",
    "head_texts",
    "needs_head",
    "resolve_routes",
    "train_route_head",
    "utterance_routes",
    "utterances_of",
]


# --- compiling a routes file ---------------------------------------------------------------


def utterances_of(routes: RoutesConfig) -> list[str]:
    """Every utterance, route by route in file order: the rows of a table's embeddings."""
    return [text for route in routes.routes for text in route.utterances]


def utterance_routes(routes: RoutesConfig) -> np.ndarray:
    """Each utterance's route index, in the order of ``utterances_of`` (intp)."""
    return np.array(
        [i for i, route in enumerate(routes.routes) for _ in route.utterances], dtype=np.intp
    )


def compile_table(
    routes: RoutesConfig,
    utterance_embeddings: np.ndarray,
    *,
    method: DecisionMethod | None = None,
    head: HeadParams | None = None,
    default_threshold: float | None = None,
    auto: bool = False,
) -> RouteTable:
    """Compile ``routes``; ``utterance_embeddings`` are its utterances' embeddings, route by
    route in file order (as ``utterances_of(routes)`` lists them).

    ``method`` overrides the file's; ``auto`` without one compiles as ``max`` (``Router``
    resolves ``auto`` properly, with the head); ``default_threshold`` is used for routes
    without a threshold when the file sets no ``default_threshold``."""
    if method is None:
        auto = auto or routes.method == "auto"
        method = "max" if routes.method == "auto" else routes.method
    return RouteTable(
        names=routes.names,
        fallback=routes.fallback.name,
        method=method,
        top_k=routes.top_k,
        thresholds=np.asarray(routes.thresholds(default_threshold), dtype=np.float32),
        utterances=tuple(utterances_of(routes)),
        utterance_route=utterance_routes(routes),
        utterance_embeddings=utterance_embeddings,
        head=head,
        auto=auto,
    )


# --- resolving the method ------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Resolution:
    """How a routes file became a route table: the method used and where it came from."""

    table: RouteTable
    requested: RoutesMethod  # the method the routes asked for
    choice: MethodChoice | None  # the cross-validation's choice and derived defaults
    head: HeadModel | None  # the trained head (auto and head)
    name_embeddings: np.ndarray | None
    note: str = ""  # why auto did not try the head

    @property
    def method(self) -> DecisionMethod:
        return self.table.method

    def record(self, routes: RoutesConfig) -> RoutesConfig:
        """``routes`` with this resolution written out: the concrete method and, where the
        file left them null, the settings derived from the cross-validation -- loading the
        result gives the same table without cross-validating again."""
        table = self.table
        update: dict[str, Any] = {"method": table.method}
        if table.method == "head" and table.head is not None and self.choice is not None:
            settings = routes.head
            update["head"] = settings.model_copy(
                update={
                    "blend": table.head.blend if settings.blend is None else settings.blend,
                    "temperature": (
                        table.head.temperature
                        if settings.temperature is None
                        else settings.temperature
                    ),
                    "min_confidence": (
                        self.choice.min_confidence
                        if settings.min_confidence is None
                        else settings.min_confidence
                    ),
                    "min_energy": (
                        self.choice.min_energy
                        if settings.min_energy is None
                        else settings.min_energy
                    ),
                },
                deep=True,
            )
            if routes.default_threshold is None:
                update["default_threshold"] = self.choice.min_similarity
        elif self.choice is not None and routes.default_threshold is None:
            update["default_threshold"] = self.choice.similarity_threshold
        return routes.model_copy(update=update, deep=True)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready account of the method choice and the head's training/cache."""
        out: dict[str, Any] = {"requested": self.requested, "method": self.table.method}
        if self.note:
            out["note"] = self.note
        if self.table.head is not None:
            head = self.table.head
            out["blend"] = head.blend
            out["temperature"] = head.temperature
            out["min_margin"] = head.min_margin
        if self.choice is not None:
            out["choice"] = self.choice.as_dict()
        if self.head is not None:
            out["head_cache"] = "hit" if self.head.cached else "miss"
            out["head_seconds"] = round(self.head.seconds, 4)
            if self.head.lexical is not None:
                out["lexical"] = {
                    "weight": self.head.lexical.weight,
                    "terms": len(self.head.lexical.vocabulary),
                }
            out["head_key"] = self.head.key
        return out


def _held_out_count(routes: RoutesConfig) -> int:
    return int(np.sum(fold_of(utterance_routes(routes)) >= 0))


AUTO_MAX_CELLS = 4_000_000
"""``auto`` leaves the head out (nearest utterance) when utterances x routes exceed this:
training and cross-validating it when the routes load would take more than about half a
minute on two cores (150 routes x 1,500 utterances = 225,000 take about a second). Set
``method: head`` to train it anyway (it is cached), or run ``fit``."""


def auto_without_head(routes: RoutesConfig) -> str | None:
    """Why ``auto`` resolves to the nearest utterance without trying the head, or None."""
    n_utterances = sum(len(route.utterances) for route in routes.routes)
    if len(routes.routes) < 2:
        return "a single route"
    held_out = _held_out_count(routes)
    if held_out < AUTO_MIN_HELD_OUT:
        return f"too few utterances to cross-validate ({held_out} < {AUTO_MIN_HELD_OUT})"
    if n_utterances * len(routes.routes) > AUTO_MAX_CELLS:
        return (
            f"{len(routes.routes)} routes x {n_utterances} utterances is too much to train "
            "the head at load time (set method: head, or run fit)"
        )
    return None


def needs_head(routes: RoutesConfig) -> bool:
    """Whether building these routes trains the head (``head``, or ``auto`` with enough
    utterances to cross-validate and not too many)."""
    if routes.method == "head":
        return True
    return routes.method == "auto" and auto_without_head(routes) is None


def head_model_key(encoder: TextEncoder) -> str:
    """The model in the head's cache key: the encoder's ``model_key`` when it has one (the
    encoder's: the name plus the Hub commit or the model directory's fingerprint, so that a
    tuned model never reuses another model's head), else its ``model_name``."""
    key = getattr(encoder, "model_key", None)
    return key if isinstance(key, str) and key else encoder.model_name


def head_texts(routes: RoutesConfig) -> list[str]:
    """The extra training texts of the head: the route names, when ``use_names``."""
    return [name_text(route.name) for route in routes.routes] if routes.head.use_names else []


def resolve_routes(
    routes: RoutesConfig,
    utterance_embeddings: np.ndarray,
    name_embeddings: np.ndarray | None,
    *,
    model_name: str,
    cache_dir: Path | None,
) -> Resolution:
    """Compile ``routes`` into a route table, resolving ``auto`` and training the head.

    * ``max``/``top5_mean``: no head; routes without a threshold get ``default_threshold``
      (0.5 when the file sets none).
    * ``head``: the head is trained on the utterances (and names); what the file leaves
      ``null`` (blend, temperature, confidence and similarity floors) comes from a 5-fold
      cross-validation on the utterances.
    * ``auto``: the same cross-validation compares max, top5_mean and the head at several
      blends and takes the most accurate; too few utterances to cross-validate -> ``max``.

    Training and cross-validation are cached under ``cache_dir`` (None: no cache)."""
    requested = routes.method
    u = np.asarray(utterance_embeddings, dtype=np.float32)
    if not needs_head(routes):
        method = "max" if requested == "auto" else requested
        note = (auto_without_head(routes) or "") if requested == "auto" else ""
        table = compile_table(routes, u, method=method, auto=requested == "auto")
        return Resolution(table, requested, None, None, name_embeddings, note)

    settings = routes.head
    derive = requested == "auto" or any(
        value is None
        for value in (
            settings.blend,
            settings.temperature,
            settings.min_confidence,
            settings.min_energy,
        )
    )
    derive = derive or (
        routes.default_threshold is None and any(r.threshold is None for r in routes.routes)
    )
    model = train_route_head(
        routes, u, name_embeddings, model_name=model_name, cache_dir=cache_dir, with_cv=derive
    )
    choice: MethodChoice | None = None
    if model.cv is not None:
        allowed: tuple[DecisionMethod, ...] = (
            ("max", "top5_mean", "head") if requested == "auto" else ("head",)
        )
        choice = choose_method(model.cv, allowed=allowed, blend=settings.blend)
    method = choice.method if choice is not None else "head"
    auto = requested == "auto"
    if method != "head":
        assert choice is not None
        table = compile_table(
            routes, u, method=method, default_threshold=choice.similarity_threshold, auto=auto
        )
        return Resolution(table, requested, choice, model, name_embeddings)
    floor = choice.min_similarity if choice is not None else None
    head = _head_params(routes, model, choice)
    table = compile_table(routes, u, method="head", head=head, default_threshold=floor, auto=auto)
    return Resolution(table, requested, choice, model, name_embeddings)


def _head_params(routes: RoutesConfig, model: HeadModel, choice: MethodChoice | None) -> HeadParams:
    """The trained head with the file's settings, or where it leaves them null, the
    cross-validation's."""
    settings = routes.head

    def pick(value: float | None, derived: float | None) -> float:
        return float(value if value is not None else (derived if derived is not None else 0.0))

    blend = pick(settings.blend, choice.blend if choice else None)
    temperature = pick(settings.temperature, choice.temperature if choice else None) or 1.0
    confidence = pick(settings.min_confidence, choice.min_confidence if choice else None)
    per_route = np.array(
        [confidence if r.min_confidence is None else r.min_confidence for r in routes.routes],
        dtype=np.float32,
    )
    return HeadParams(
        weights=model.weights,
        bias=model.bias,
        blend=blend,
        temperature=temperature,
        min_confidence=per_route,
        min_margin=settings.min_margin,
        lexical=model.lexical,
        min_energy=settings.min_energy if settings.min_energy is not None else _energy(choice),
    )


def _energy(choice: MethodChoice | None) -> float | None:
    """The cross-validation's energy floor, or None (no floor)."""
    return choice.min_energy if choice is not None else None


def train_route_head(
    routes: RoutesConfig,
    utterance_embeddings: np.ndarray,
    name_embeddings: np.ndarray | None,
    *,
    model_name: str,
    cache_dir: Path | None,
    with_cv: bool = True,
) -> HeadModel:
    """The head of ``routes`` (trained on its utterances, plus the names when
    ``head.use_names``), with its cross-validation when ``with_cv``; cached in ``cache_dir``."""
    u = np.asarray(utterance_embeddings, dtype=np.float32)
    route_of = utterance_routes(routes)
    names = name_embeddings if routes.head.use_names else None
    lexical = routes.head.lexical
    key = head_cache_key(
        model_name,
        [route.name for route in routes.routes],
        [route.utterances for route in routes.routes],
        l2=routes.head.l2,
        use_names=names is not None,
        with_cv=with_cv,
        dim=int(u.shape[1]),
        lexical=lexical,
    )
    return load_or_train_head(
        u,
        route_of,
        names,
        len(routes.routes),
        key=key,
        l2=routes.head.l2,
        with_cv=with_cv,
        cache_dir=cache_dir,
        lexical=lexical,
        texts=utterances_of(routes),
        name_texts=head_texts(routes) if names is not None else [],
    )


class Router:
    """Routes texts or embeddings with one routes config and one encoder.

    ``cache_dir``: where trained route heads are cached (default: ``heads/`` under the
    encoder's cache root, see ``_files.default_cache_root``); ``cache=False``: none.

    The library API: ``Router.from_file(path)``, ``router(text)`` -> a ``RouteDecision``,
    ``router.route_batch(texts)`` and ``await router.aroute(text_or_texts)`` (the encoder runs
    in a worker thread, off the event loop)."""

    def __init__(
        self,
        routes: RoutesConfig,
        encoder: TextEncoder,
        *,
        cache_dir: Path | None = None,
        cache: bool = True,
        resolve: Callable[..., Resolution] = resolve_routes,
    ) -> None:
        """``resolve``: what compiles the routes (``resolve_routes``, or a stand-in that runs
        it elsewhere, e.g. in another process)."""
        self.routes = routes
        self.encoder = encoder
        self.model_key = head_model_key(encoder)
        texts = utterances_of(routes)
        extra = head_texts(routes) if needs_head(routes) else []
        embeddings = encoder.encode(texts + extra)
        self.utterance_embeddings = np.asarray(embeddings[: len(texts)], dtype=np.float32)
        name_embeddings = np.asarray(embeddings[len(texts) :], dtype=np.float32) if extra else None
        directory = (cache_dir or default_head_cache_dir()) if cache else None
        self.cache_dir = directory
        self.name_embeddings = name_embeddings
        self.resolution = resolve(
            routes,
            self.utterance_embeddings,
            name_embeddings,
            model_name=self.model_key,
            cache_dir=directory,
        )
        self.table = self.resolution.table
        self.version = routes_version(routes)
        self._metadata = {route.name: route.metadata for route in routes.routes}

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        encoder: TextEncoder | None = None,
        *,
        cache_dir: Path | None = None,
        cache: bool = True,
    ) -> Router:
        """A router for a routes file (YAML, or JSON when it ends in ``.json``) with
        ``encoder``, or the default ``Encoder`` (all-MiniLM-L6-v2 on ONNX Runtime) when None.
        Raises ``ConfigError`` naming the file, the route and the field of any problem."""
        routes = load_routes(path)
        if encoder is None:
            encoder = default_encoder_factory()()
        return cls(routes, encoder, cache_dir=cache_dir, cache=cache)

    def decide(self, embeddings: np.ndarray, texts: Sequence[str] | None = None) -> Decisions:
        """Decide for encoded queries; ``texts`` (theirs, in order) are needed when the head
        has a lexical view (``head.lexical`` > 0, the default)."""
        return decide(self.table, embeddings, texts)

    def route(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Encode, decide and explain: one JSON-ready dict per text, in input order."""
        if not texts:
            return []
        decisions = self.decide(self.encoder.encode(texts), texts)
        extra = {"model": self.encoder.model_name, "routes_version": self.version}
        return [{**decisions.explain(i, self.table), **extra} for i in range(len(decisions))]

    def route_batch(self, texts: Sequence[str]) -> list[RouteDecision]:
        """Route texts in one encoder call: one ``RouteDecision`` per text, in input order."""
        if isinstance(texts, str):
            raise TypeError("route_batch takes a sequence of texts; use router(text) for one")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
        return [
            RouteDecision.from_explanation(
                text, explained, self._metadata.get(explained["route"], {})
            )
            for text, explained in zip(texts, self.route(texts), strict=True)
        ]

    def __call__(self, text: str) -> RouteDecision:
        """Route one text."""
        if not isinstance(text, str):
            raise TypeError(f"router(text) takes a str, not {type(text).__name__}")
        return self.route_batch([text])[0]

    @overload
    async def aroute(self, texts: str) -> RouteDecision: ...  # type: ignore[overload-overlap]

    @overload
    async def aroute(self, texts: Sequence[str]) -> list[RouteDecision]: ...

    async def aroute(self, texts: str | Sequence[str]) -> RouteDecision | list[RouteDecision]:
        """``router(text)`` or ``route_batch(texts)`` in a worker thread (``asyncio.to_thread``),
        so encoding does not block the event loop."""
        if isinstance(texts, str):
            return await asyncio.to_thread(self.__call__, texts)
        return await asyncio.to_thread(self.route_batch, texts)
