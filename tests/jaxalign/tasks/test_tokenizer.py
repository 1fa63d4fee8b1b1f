"""CharTokenizer: fixed ids, round trip, EOS/PAD handling and error messages."""
import dataclasses

import numpy as np
import pytest

from jaxalign.tasks.tokenizer import CharTokenizer


def test_fixed_vocabulary():
    tok = CharTokenizer()
    assert tok.vocab_size == 15
    assert (tok.PAD_ID, tok.EOS_ID) == (0, 1)
    assert CharTokenizer.PAD_ID == 0 and CharTokenizer.EOS_ID == 1
    assert tok.encode("0123456789+=;") == list(range(2, 15))


def test_round_trip():
    tok = CharTokenizer()
    text = "7+5+3+9=7+5=12;12+3=15;15+9=24"
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert all(2 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_decode_stops_at_eos_and_skips_pad():
    tok = CharTokenizer()
    ids = [0, 0] + tok.encode("1+2") + [0] + tok.encode("=3") + [1] + tok.encode("99") + [0]
    assert tok.decode(ids) == "1+2=3"
    # Ids after the EOS are never read, even invalid ones.
    assert tok.decode(tok.encode("4") + [1, 99, -3]) == "4"
    # NumPy arrays decode like lists.
    assert tok.decode(np.array(tok.encode("12;") + [1], dtype=np.int32)) == "12;"


def test_encode_error_names_char_position_and_text():
    tok = CharTokenizer()
    with pytest.raises(ValueError) as info:
        tok.encode("1+2 =3")
    message = str(info.value)
    assert "' '" in message and "position 3" in message and "'1+2 =3'" in message
    with pytest.raises(ValueError, match=r"'x' at position 0"):
        tok.encode("x")


@pytest.mark.parametrize("bad, position", [([2, 3, 15], 2), ([-1], 0), ([0, 2, 100, 1], 2)])
def test_decode_error_names_id_and_position(bad, position):
    tok = CharTokenizer()
    with pytest.raises(ValueError, match=rf"id {bad[position]} at position {position}"):
        tok.decode(bad)


def test_frozen_and_stateless():
    tok = CharTokenizer()
    with pytest.raises(dataclasses.FrozenInstanceError):
        tok.PAD_ID = 5  # type: ignore[misc]
    assert CharTokenizer() == tok
