"""Phrase fuzzing: any text through tokenization and the Predictor never crashes, and every
predicted box lies inside its image (whatever the image size)."""

from __future__ import annotations

import math
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

# Any Unicode text: control characters, surrogates excluded (not encodable), emoji, RTL marks...
PHRASE = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
# ...plus hand-picked awkward pieces, so short runs still meet them.
AWKWARD = st.sampled_from(
    ["", " ", "\t\n", "\x00", "\x1b[31m", "🐈‍⬛", "\u202e", "\u200b", "[CLS]", "[SEP]", "[PAD]",
     "##ing", "left" * 50, "ǅ", "ﬁ", "Ⅻ", "\ufeff", "a\u0301"]
)  # fmt: skip
PHRASES = st.lists(st.one_of(PHRASE, AWKWARD, st.lists(AWKWARD).map("".join)), min_size=1,
                   max_size=3)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt):
    """The tokenizer a tiny checkpoint uses."""
    from vgdistill.models.checkpoint import read_config
    from vgdistill.models.factory import build_tokenizer

    recipe, _ = read_config(tiny_ckpt)
    return build_tokenizer(recipe.model)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(phrase=st.one_of(PHRASE, AWKWARD), max_len=st.integers(3, 24))
def test_any_phrase_tokenizes_to_the_batch_contract(tokenizer, phrase, max_len):
    """[CLS] ... [SEP], exactly max_len ids, mask 1 on a prefix then 0, ids in the vocabulary."""
    from vgdistill.data.loader import encode_phrase

    ids, mask = encode_phrase(tokenizer, phrase, max_len)
    n = sum(mask)
    assert len(ids) == len(mask) == max_len
    assert mask == [1] * n + [0] * (max_len - n) and n >= 2
    assert ids[0] == tokenizer.cls_token_id and ids[n - 1] == tokenizer.sep_token_id
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    phrases=PHRASES,
    width=st.integers(1, 120),
    height=st.integers(1, 120),
    seed=st.integers(0, 2**16),
)
def test_any_phrase_predicts_a_box_inside_the_image(predictor, phrases, width, height, seed):
    """Phrases without a letter or digit (after NFKC) are refused with VGError; every other
    phrase gets a box in the image."""
    from vgdistill.errors import VGError

    arr = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(arr)
    if any(not any(c.isalnum() for c in unicodedata.normalize("NFKC", p)) for p in phrases):
        with pytest.raises(VGError, match="is empty"):
            predictor.predict(image, phrases)
        return
    boxes = predictor.predict(image, phrases)
    assert len(boxes) == len(phrases)
    for x1, y1, x2, y2 in boxes:
        assert all(math.isfinite(v) for v in (x1, y1, x2, y2))
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
