"""Word timestamps from an alignment's path and token probabilities: words cut at spaces and punctuation, the
marks joined to their word, times in seconds of 50 encoder frames (checked by hand)."""

import pytest

from nota_model.word_times import Word, aligned_words, token_start_seconds, word_tokens


def decoder(pieces: dict[int, bytes]):
    """A tokenizer's decode over byte pieces: an incomplete UTF-8 character reads as U+FFFD, as Whisper's does."""
    return lambda ids: b"".join(pieces[token] for token in ids).decode("utf-8", errors="replace")


def path_through(frames: list[int]) -> list[tuple[int, int]]:
    """A monotonic path giving token i the frames from frames[i] up to the next token's first frame."""
    return [(token, frame) for token, (first, following) in enumerate(zip(frames, [*frames[1:], frames[-1] + 1]))
            for frame in range(first, following)]


def test_words_are_cut_at_spaces_and_take_their_first_tokens_frame_and_the_next_words():
    texts = [" Mr", ".", " John", " Dash", "wood", ",", " ok"]
    decode = decoder({token: text.encode() for token, text in enumerate(texts)})
    frames = [0, 10, 15, 30, 40, 55, 60, 75]  # each token's first frame; the last is the end of text's
    words = aligned_words(range(7), [0.5, 1.0, 0.8, 0.6, 0.8, 1.0, 0.9], path_through(frames), decode, "en")
    assert words == [Word(" Mr.", 0.0, 0.2, 0.5), Word(" John", 0.3, 0.6, 0.8),
                     Word(" Dashwood,", 0.6, pytest.approx(1.1), pytest.approx(0.7)), Word(" ok", 1.2, 1.5, 0.9)]
    assert "".join(word.word for word in words) == "".join(texts)


def test_opening_marks_join_the_next_word_and_closing_marks_the_previous():
    texts = [" I", " said", ' "', " yes", '"', "."]
    decode = decoder({token: text.encode() for token, text in enumerate(texts)})
    words = aligned_words(range(6), [1.0] * 6, path_through([0, 5, 10, 15, 20, 25, 30]), decode, "en")
    assert [(word.word, word.start, word.end) for word in words] == [(" I", 0.0, 0.1), (" said", 0.1, 0.2), (' " yes".', 0.3, 0.4)]


def test_a_character_split_over_tokens_stays_whole_and_unspaced_languages_get_a_word_a_character():
    decode = decoder({0: b" caf", 1: b"\xc3", 2: b"\xa9", 3: b" ok"})
    assert word_tokens([0, 1, 2, 3], decode, "fr") == [(" café", 3), (" ok", 1)]
    ni, hao = "你".encode(), "好".encode()
    decode = decoder({0: ni[:2], 1: ni[2:], 2: hao})
    assert word_tokens([0, 1, 2], decode, "zh") == [("你", 2), ("好", 1)]


def test_a_path_that_skips_a_token_is_refused():
    with pytest.raises(ValueError, match="skips a token"):
        token_start_seconds([(0, 0), (2, 1)], 3)


def test_a_word_shifted_into_its_recording_stays_inside_its_piece():
    assert Word(" a", 0.5, 1.0, 0.9).shifted(10.0, 20.0) == Word(" a", 10.5, 11.0, 0.9)
    assert Word(" a", 0.5, 1.5, 0.9).shifted(10.0, 11.2) == Word(" a", 10.5, 11.2, 0.9)
    assert Word(" a", 1.5, 1.6, 0.9).shifted(10.0, 11.2) == Word(" a", 11.2, 11.2, 0.9)
