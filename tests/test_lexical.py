"""The route head's lexical view (semroute_stream._routing.lexical) and how the head uses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from semroute_stream._routing.decision import decide
from semroute_stream._routing.lexical import LexicalHead, Vocabulary, terms
from semroute_stream._routing.router import resolve_routes, train_route_head
from semroute_stream._routing.schema import RoutesConfig

DIM = 16


def test_terms_are_lower_cased_words_and_adjacent_pairs() -> None:
    assert terms("Top-up REVERTED, a £5 fee") == [
        "top",
        "up",
        "reverted",
        "fee",
        "top up",
        "up reverted",
        "reverted fee",
    ]
    assert terms("") == [] and terms("a b") == []


def test_vocabulary_rows_are_unit_tf_idf_and_unknown_terms_are_ignored() -> None:
    texts = ["refund my card", "refund the charge", "card arrived late"]
    vocabulary = Vocabulary.fit(texts)
    assert "refund" in vocabulary.index and "refund my" in vocabulary.index
    # "refund" is in two texts, "charge" in one: the rarer term weighs more.
    idf = vocabulary.idf
    assert idf[vocabulary.index["charge"]] > idf[vocabulary.index["refund"]]
    rows = vocabulary.transform([*texts, "zebras sing opera", ""])
    assert rows.shape == (5, len(vocabulary)) and rows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rows[:3], axis=1), 1.0, rtol=1e-6)
    assert not rows[3:].any()
    only_refund = vocabulary.transform(["REFUND"])[0]
    assert np.flatnonzero(only_refund).tolist() == [vocabulary.index["refund"]]


def test_the_vocabulary_keeps_the_most_frequent_terms_deterministically() -> None:
    texts = ["alpha beta", "alpha gamma", "alpha beta delta"]
    small = Vocabulary.fit(texts, max_terms=2)
    # df: alpha 3, "alpha beta" 2, beta 2, the rest 1; ties go in alphabetical order.
    assert small.terms == ("alpha", "alpha beta")
    assert Vocabulary.fit(list(reversed(texts)), max_terms=2).terms == small.terms


def test_a_lexical_head_checks_its_shapes() -> None:
    vocabulary = Vocabulary.fit(["a word", "another word"])
    with pytest.raises(ValueError, match="weights"):
        LexicalHead(vocabulary, np.zeros((1, 2)), np.zeros(2), 0.5)
    with pytest.raises(ValueError, match="weight must be > 0"):
        LexicalHead(vocabulary, np.zeros((len(vocabulary), 2)), np.zeros(2), 0.0)
    bias = np.array([0.5, -1.0])
    head = LexicalHead(vocabulary, np.ones((len(vocabulary), 2)), bias, 0.5)
    logits = head.logits(["word", "nothing"])
    assert logits.shape == (2, 2)
    np.testing.assert_allclose(logits[1], bias)  # no known term: the bias alone
    assert np.all(logits[0] > bias)  # "word" is known and every weight is positive


def keyword_case(
    rng: np.random.Generator, lexical: float
) -> tuple[RoutesConfig, np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Two routes whose embeddings come from one distribution (the encoder cannot tell them
    apart) but whose texts differ by one keyword; queries of both, with the route they are."""
    words = ["refund", "invoice"]
    fillers = ["please", "my", "about", "the", "order", "help", "now", "again"]

    def text(keyword: str) -> str:
        picked = rng.choice(fillers, size=3, replace=False)
        return " ".join([*picked[:2], keyword, picked[2]])

    cfg = RoutesConfig.model_validate(
        {
            "method": "head",
            "default_threshold": -1.0,
            "head": {
                "use_names": False,
                "lexical": lexical,
                "min_confidence": 0.0,
                "min_energy": -1000.0,  # no fallback: top-1 is what is measured
            },
            "routes": [
                {"name": f"r{k}", "utterances": [text(word) for _ in range(12)]}
                for k, word in enumerate(words)
            ],
        }
    )
    centre = np.eye(DIM)[0]

    def vectors(n: int) -> np.ndarray:
        x = centre + 0.3 * rng.normal(size=(n, DIM))
        out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        return out

    gold = np.repeat([0, 1], 20)
    texts = [text(words[g]) for g in gold]
    return cfg, vectors(24), texts, vectors(len(gold)), gold


def test_the_lexical_view_separates_routes_the_embeddings_cannot(tmp_path: Path) -> None:
    accuracy = {}
    for lexical in (0.0, 1.0):
        rng = np.random.default_rng(3)
        cfg, utterances, texts, queries, gold = keyword_case(rng, lexical)
        table = resolve_routes(cfg, utterances, None, model_name="m", cache_dir=tmp_path).table
        assert table.head is not None and (table.head.lexical is not None) == (lexical > 0)
        accuracy[lexical] = float(np.mean(decide(table, queries, texts).route == gold))
    assert accuracy[1.0] >= 0.9
    assert accuracy[0.0] <= 0.7  # embeddings alone: about chance


def test_a_lexical_head_needs_the_query_texts(tmp_path: Path) -> None:
    cfg, utterances, texts, queries, _ = keyword_case(np.random.default_rng(4), 0.25)
    table = resolve_routes(cfg, utterances, None, model_name="m", cache_dir=None).table
    with pytest.raises(ValueError, match="pass the query texts"):
        decide(table, queries)
    with pytest.raises(ValueError, match="3 texts"):
        decide(table, queries, texts[:3])


def test_the_lexical_view_is_cached_with_the_head(tmp_path: Path) -> None:
    cfg, utterances, texts, _, _ = keyword_case(np.random.default_rng(5), 0.25)
    cold = train_route_head(cfg, utterances, None, model_name="m", cache_dir=tmp_path)
    hit = train_route_head(cfg, utterances, None, model_name="m", cache_dir=tmp_path)
    assert not cold.cached and hit.cached
    assert cold.lexical is not None and hit.lexical is not None
    assert hit.lexical.vocabulary.terms == cold.lexical.vocabulary.terms
    assert hit.lexical.weight == 0.25
    np.testing.assert_array_equal(hit.lexical.logits(texts), cold.lexical.logits(texts))
    # Another weight is another head: not served from this cache entry.
    other = cfg.model_copy(update={"head": cfg.head.model_copy(update={"lexical": 0.5})})
    assert not train_route_head(other, utterances, None, model_name="m", cache_dir=tmp_path).cached
