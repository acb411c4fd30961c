"""The sentence encoder (semroute_stream._encoder.encoder) on the real all-MiniLM-L6-v2 model."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pydantic
import pytest
from onnx import TensorProto, helper, numpy_helper

from semroute_stream._encoder import Encoder, EncoderConfig
from semroute_stream._encoder import default_model as mb
from semroute_stream._errors import ModelError

REFERENCE = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "reference"
    / "minilm_l6_v2_reference.json"
)

# Words that the MiniLM WordPiece vocabulary keeps as one token each.
ONE_TOKEN_WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "then",
    "it",
    "ran",
    "to",
    "my",
    "house",
    "with",
    "some",
    "red",
    "apples",
]

MIXED = [
    "refund",
    "My password reset email never arrived, can you resend it?",
    "",
    " ".join(ONE_TOKEN_WORDS * 8),  # 130 words
    "lol",
    "The export to PDF button does nothing when I click it in Safari. " * 3,
    "?",
    "Why did my monthly bill go up from $29 to $49?",
]


def cosines(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    return np.asarray(
        (a64 * b64).sum(axis=1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
    )


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache root for the whole session (test_model_build.py uses the same path)."""
    return tmp_path_factory.getbasetemp() / "semroute-model-cache"


@pytest.fixture(scope="module")
def encoder(model_cache: Path) -> Encoder:
    return Encoder(EncoderConfig(cache_dir=model_cache))


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    data: dict[str, object] = json.loads(REFERENCE.read_text(encoding="utf-8"))
    return data


# ------------------------------------------------------------------------------------------------
# Fidelity
# ------------------------------------------------------------------------------------------------


def test_attributes(encoder: Encoder) -> None:
    assert encoder.model_name == "sentence-transformers/all-MiniLM-L6-v2"
    assert encoder.dim == 384
    assert encoder.max_length == 256


def test_reference_embeddings_batch_and_single(
    encoder: Encoder, reference: dict[str, object]
) -> None:
    sentences = reference["sentences"]
    assert isinstance(sentences, list) and len(sentences) == 48
    expected = np.asarray(reference["embeddings"], dtype=np.float32)
    assert reference["max_seq_length"] == encoder.max_length

    together = encoder.encode(sentences)
    one_by_one = np.vstack([encoder.encode([s]) for s in sentences])
    for got in (together, one_by_one):
        cos = cosines(got, expected)
        assert cos.min() >= 0.9999, [
            (sentences[i][:40], float(cos[i])) for i in np.argsort(cos)[:3]
        ]
    assert cosines(together, one_by_one).min() > 0.99999


# Batch invariance: tests/test_backends.py, on every backend and precision of the machine.


def test_output_dtype_shape_and_norm(encoder: Encoder) -> None:
    out = encoder.encode(MIXED)
    assert out.dtype == np.float32
    assert out.shape == (len(MIXED), 384)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert out.flags.c_contiguous
    # Different texts give different embeddings.
    assert cosines(out[:1], out[1:2])[0] < 0.99


def test_empty_batch(encoder: Encoder) -> None:
    out = encoder.encode([])
    assert out.shape == (0, 384)
    assert out.dtype == np.float32
    assert encoder.count_tokens([]) == []
    assert encoder.prepare([]) == []


def test_rejects_bare_string_and_non_strings(encoder: Encoder) -> None:
    with pytest.raises(TypeError):
        encoder.encode("a single string")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        encoder.encode(["ok", 3])  # type: ignore[list-item]


def test_accepts_any_sequence(encoder: Encoder) -> None:
    texts = ("hello there", "refund please")
    assert np.array_equal(encoder.encode(texts), encoder.encode(list(texts)))


# ------------------------------------------------------------------------------------------------
# Tokenization, truncation, padding, bucketing
# ------------------------------------------------------------------------------------------------


def test_truncation_at_max_length(encoder: Encoder) -> None:
    words = (ONE_TOKEN_WORDS * 30)[:400]
    long_text = " ".join(words)
    assert encoder.count_tokens([long_text]) == [256]
    head = " ".join(words[:254])  # [CLS] + 254 words + [SEP] = 256 tokens
    assert encoder.count_tokens([head]) == [256]
    got = encoder.encode([long_text, head])
    assert cosines(got[:1], got[1:])[0] > 0.99999
    # A text shorter than max_length is not truncated.
    short = " ".join(words[:100])
    assert encoder.count_tokens([short]) == [102]


def test_small_max_length_truncates(encoder: Encoder, model_cache: Path) -> None:
    small = Encoder(EncoderConfig(cache_dir=model_cache, max_length=8))
    assert small.max_length == 8
    text = " ".join(ONE_TOKEN_WORDS)
    head = " ".join(ONE_TOKEN_WORDS[:6])  # [CLS] + 6 words + [SEP] = 8 tokens
    assert small.count_tokens([text, head]) == [8, 8]
    full = encoder.encode([text, head])
    truncated = small.encode([text])
    assert cosines(truncated, full[:1])[0] < 0.99  # truncation changed the result
    assert cosines(truncated, full[1:])[0] > 0.99999  # ... to the embedding of the first tokens


def test_padding_is_to_the_longest_in_the_sub_batch_not_128(encoder: Encoder) -> None:
    texts = ["hi", "hello there", "ok"]
    counts = encoder.count_tokens(texts)
    assert counts == [3, 4, 3]
    (batch,) = encoder.prepare(texts)
    assert batch.input_ids.shape == (3, 4)
    assert batch.attention_mask.sum(axis=1).tolist() == sorted(counts)
    assert batch.input_ids.dtype == np.int64
    assert batch.input_ids[0, 0] == 101  # [CLS]
    assert (batch.input_ids[batch.attention_mask == 0] == 0).all()  # [PAD]


def test_length_sorting_restores_input_order(encoder: Encoder) -> None:
    texts = [" ".join(ONE_TOKEN_WORDS[: (7 * i) % 17 + 1]) + f" item {i}" for i in range(20)]
    counts = encoder.count_tokens(texts)
    assert counts != sorted(counts)
    batches = encoder.prepare(texts)
    order = np.concatenate([b.indices for b in batches])
    assert sorted(order.tolist()) == list(range(len(texts)))
    assert [counts[i] for i in order] == sorted(counts)  # sub-batches were built sorted
    together = encoder.encode(texts)
    alone = np.vstack([encoder.encode([t]) for t in texts])
    assert cosines(together, alone).min() > 0.99999


def test_bucketing_keeps_padding_low(encoder: Encoder) -> None:
    texts = [" ".join(ONE_TOKEN_WORDS[: n % 17 + 1]) for n in range(60)] + [MIXED[3], MIXED[5]]
    batches = encoder.prepare(texts)
    real = sum(int(b.attention_mask.sum()) for b in batches)
    padded = sum(b.input_ids.size for b in batches)
    assert real / padded > 0.85
    assert len(batches) < len(texts) / 4  # ... without one model call per text


def test_sub_batch_limits(model_cache: Path) -> None:
    enc = Encoder(EncoderConfig(cache_dir=model_cache, max_batch_size=3, max_batch_tokens=40))
    texts = [" ".join(ONE_TOKEN_WORDS[: n % 15 + 1]) for n in range(11)]
    batches = enc.prepare(texts)
    for b in batches:
        rows, width = b.input_ids.shape
        assert rows <= 3
        assert rows * width <= 40 or rows == 1
        assert width == b.attention_mask.sum(axis=1).max()
    assert sum(len(b.indices) for b in batches) == len(texts)

    naive = Encoder(
        EncoderConfig(cache_dir=model_cache, sort_by_length=False, max_batch_tokens=10**6)
    )
    (one,) = naive.prepare(texts)
    assert one.indices.tolist() == list(range(len(texts)))
    assert one.input_ids.shape == (len(texts), max(naive.count_tokens(texts)))
    assert cosines(enc.encode(texts), naive.encode(texts)).min() > 0.99999


def test_encode_is_thread_safe(encoder: Encoder) -> None:
    texts = [f"{t} #{i}" for i, t in enumerate(MIXED * 2) if len(t) < 200]
    expected = encoder.encode(texts)
    results: dict[int, npt.NDArray[np.float32]] = {}

    def work(k: int) -> None:
        results[k] = encoder.encode(texts[k:] + texts[:k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, got in results.items():
        assert cosines(np.roll(got, k, axis=0), expected).min() > 0.99999


# ------------------------------------------------------------------------------------------------
# Config and user model directories
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"max_length": 0}, {"max_length": 513}, {"max_batch_size": 0}, {"unknown": 1}],
)
def test_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        EncoderConfig(**kwargs)  # type: ignore[arg-type]


def test_config_defaults() -> None:
    cfg = EncoderConfig()
    assert cfg.model == "all-MiniLM-L6-v2"
    assert (cfg.max_length, cfg.intra_op_threads, cfg.inter_op_threads) == (256, 0, 1)
    assert cfg.allow_spinning is False
    assert cfg.max_batch_size == 64
    assert cfg.cache_dir is None


def test_user_dir_with_last_hidden_state(encoder: Encoder, model_cache: Path) -> None:
    model_dir = model_cache / mb.CACHE_SUBDIR
    user = Encoder(EncoderConfig(model=str(model_dir), intra_op_threads=1, allow_spinning=True))
    assert user.model_name == model_dir.name
    assert user.dim == 384
    assert cosines(user.encode(MIXED), encoder.encode(MIXED)).min() > 0.99999


def _pooled_wrapper(model_dir: Path, out_dir: Path) -> None:
    """A user model whose output is already pooled: the built model + mean pooling (not
    normalised), with an int32 token_type_ids input that shifts the result unless it is zero."""
    model = onnx.load(str(model_dir / "model.onnx"))
    g = model.graph
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array([1], np.int64), "pool.axis1"),
            numpy_helper.from_array(np.array([2], np.int64), "pool.axis2"),
        ]
    )
    g.node.extend(
        [
            helper.make_node("Cast", ["attention_mask"], ["pool.mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["pool.mask_f", "pool.axis2"], ["pool.mask3"]),
            helper.make_node("Mul", ["last_hidden_state", "pool.mask3"], ["pool.masked"]),
            helper.make_node("ReduceSum", ["pool.masked", "pool.axis1"], ["pool.sum"], keepdims=0),
            helper.make_node(
                "ReduceSum", ["pool.mask_f", "pool.axis1"], ["pool.count"], keepdims=1
            ),
            helper.make_node("Div", ["pool.sum", "pool.count"], ["pool.mean"]),
            helper.make_node("Cast", ["token_type_ids"], ["pool.tt_f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["pool.tt_f", "pool.axis1"], ["pool.tt_sum"], keepdims=1),
            helper.make_node("Add", ["pool.mean", "pool.tt_sum"], ["sentence_embedding"]),
        ]
    )
    g.input.append(
        helper.make_tensor_value_info("token_type_ids", TensorProto.INT32, ["batch", "sequence"])
    )
    del g.output[:]
    g.output.append(
        helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", 384])
    )
    out_dir.mkdir()
    onnx.save(model, str(out_dir / "model.onnx"))
    shutil.copy2(model_dir / "tokenizer.json", out_dir / "tokenizer.json")


def test_user_dir_with_pooled_output(encoder: Encoder, model_cache: Path, tmp_path: Path) -> None:
    user_dir = tmp_path / "my-pooled-model"
    _pooled_wrapper(model_cache / mb.CACHE_SUBDIR, user_dir)
    user = Encoder(EncoderConfig(model=str(user_dir), max_length=128))
    assert user.model_name == "my-pooled-model"
    assert user.dim == 384
    assert user.max_length == 128
    out = user.encode(MIXED[:3])
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)  # normalised by the encoder
    assert cosines(out, encoder.encode(MIXED[:3])).min() > 0.99999


def test_unknown_model_name_or_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="neither the built-in 'all-MiniLM-L6-v2'"):
        Encoder(EncoderConfig(model="all-mpnet-base-v2"))
    with pytest.raises(ModelError, match="neither the built-in"):
        Encoder(EncoderConfig(model=str(tmp_path / "does-not-exist")))
    afile = tmp_path / "model.onnx"
    afile.write_bytes(b"")
    with pytest.raises(ModelError, match="not a directory"):
        Encoder(EncoderConfig(model=str(afile)))


def test_user_dir_missing_files(model_cache: Path, tmp_path: Path) -> None:
    built = model_cache / mb.CACHE_SUBDIR
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    (no_tok / "model.onnx").symlink_to(built / "model.onnx")
    with pytest.raises(ModelError, match=r"has no tokenizer\.json"):
        Encoder(EncoderConfig(model=str(no_tok)))

    no_model = tmp_path / "no-model"
    no_model.mkdir()
    shutil.copy2(built / "tokenizer.json", no_model / "tokenizer.json")
    with pytest.raises(ModelError, match=r"has no model\.onnx"):
        Encoder(EncoderConfig(model=str(no_model)))


def test_user_dir_with_broken_files(model_cache: Path, tmp_path: Path) -> None:
    built = model_cache / mb.CACHE_SUBDIR
    bad_model = tmp_path / "bad-model"
    bad_model.mkdir()
    (bad_model / "model.onnx").write_bytes(b"not an onnx model")
    shutil.copy2(built / "tokenizer.json", bad_model / "tokenizer.json")
    with pytest.raises(ModelError, match="cannot load ONNX model"):
        Encoder(EncoderConfig(model=str(bad_model)))

    bad_tok = tmp_path / "bad-tokenizer"
    bad_tok.mkdir()
    (bad_tok / "model.onnx").symlink_to(built / "model.onnx")
    (bad_tok / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelError, match="cannot load tokenizer"):
        Encoder(EncoderConfig(model=str(bad_tok)))


def test_corrupt_cached_model_says_how_to_rebuild(model_cache: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(model_cache / mb.CACHE_SUBDIR, cache / mb.CACHE_SUBDIR)
    model = cache / mb.CACHE_SUBDIR / "model.onnx"
    model.write_bytes(b"\0" * model.stat().st_size)  # same size: the cheap marker check passes
    with pytest.raises(ModelError, match="to rebuild the cached model"):
        Encoder(EncoderConfig(cache_dir=cache))


# ------------------------------------------------------------------------------------------------
# Pooling, query prefix, normalisation
# ------------------------------------------------------------------------------------------------


def test_pooling_modes_differ_and_follow_their_definition(model_cache: Path) -> None:
    texts = ["refund my order", "The export to PDF button does nothing in Safari."]
    raw = {
        mode: Encoder(
            EncoderConfig(
                cache_dir=model_cache, pooling=mode, normalize=False, backend="onnxruntime"
            )
        )
        for mode in ("mean", "cls", "max", "lasttoken")
    }
    assert all(enc.pooling == mode for mode, enc in raw.items())
    got = {mode: enc.encode(texts) for mode, enc in raw.items()}
    for a in got:
        for b in got:
            if a < b:
                assert cosines(got[a], got[b]).max() < 0.999, (a, b)
    # max pooling dominates mean pooling coordinate-wise; CLS of a text is its CLS alone.
    assert np.all(got["max"] >= got["mean"] - 1e-5)
    assert np.allclose(raw["cls"].encode(texts[:1]), got["cls"][:1], atol=1e-5)


def test_pooling_auto_reads_the_model_card(model_cache: Path, tmp_path: Path) -> None:
    built = mb.provision_default_model(model_cache)
    user = tmp_path / "cls-model"
    user.mkdir()
    for name in ("model.onnx", "tokenizer.json"):
        shutil.copy2(built / name, user / name)
    (user / "1_Pooling").mkdir()
    (user / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 384, "pooling_mode_cls_token": True}),
        encoding="utf-8",
    )
    enc = Encoder(EncoderConfig(model=str(user), backend="onnxruntime"))
    assert enc.pooling == "cls"
    explicit = Encoder(EncoderConfig(model=str(user), backend="onnxruntime", pooling="cls"))
    assert cosines(enc.encode(MIXED), explicit.encode(MIXED)).min() > 0.99999
    default = Encoder(EncoderConfig(cache_dir=model_cache, backend="onnxruntime"))
    assert default.pooling == "mean"  # all-MiniLM-L6-v2 declares mean; no card means mean too


def test_query_prefix_is_prepended(model_cache: Path) -> None:
    plain = Encoder(EncoderConfig(cache_dir=model_cache, backend="onnxruntime"))
    prefixed = Encoder(
        EncoderConfig(cache_dir=model_cache, backend="onnxruntime", query_prefix="query: ")
    )
    texts = ["how do I get a refund", "reset my password"]
    assert cosines(prefixed.encode(texts), plain.encode([f"query: {t}" for t in texts])).min() > (
        0.99999
    )
    assert cosines(prefixed.encode(texts), plain.encode(texts)).max() < 0.999
    assert prefixed.count_tokens(["refund"]) == [plain.count_tokens(["refund"])[0] + 2]


def test_normalize_off_keeps_raw_norms(model_cache: Path) -> None:
    raw = Encoder(EncoderConfig(cache_dir=model_cache, backend="onnxruntime", normalize=False))
    unit = Encoder(EncoderConfig(cache_dir=model_cache, backend="onnxruntime"))
    got = raw.encode(MIXED)
    norms = np.linalg.norm(got, axis=1)
    assert np.all(np.abs(norms - 1.0) > 1e-3)
    assert cosines(got, unit.encode(MIXED)).min() > 0.99999
