import pytest

from jobs.metrics import asr_rows_wer, corpus_wer, normalize


def test_corpus_wer_counts_edits_over_all_reference_words():
    # Hand count: item 1 deletes "the" (1 D), item 2 inserts "big" (1 I); 6 + 2 reference words.
    result = corpus_wer(["the cat sat on the mat", "hello world"], ["the cat sat on mat", "hello big world"])
    assert (result.substitutions, result.deletions, result.insertions, result.reference_words) == (0, 1, 1, 8)
    assert result.wer == pytest.approx(2 / 8)
    # Characters: "the " deleted and "big " inserted, over 22 + 11 reference characters.
    assert result.cer == pytest.approx(8 / 33)


def test_corpus_wer_is_not_the_mean_of_item_wers():
    result = corpus_wer(["a b c d e f g h i j", "x"], ["a b c d e f g h i j", "y"])
    assert result.wer == pytest.approx(1 / 11)  # the item mean would be 0.5


def test_the_whisper_english_normalizer_applies_before_scoring():
    assert normalize("Mr. Dashwood's COLOUR, isn't it?") == normalize("mister dashwood's color is not it")
    assert corpus_wer(["Hello, World!"], ["hello world"]).wer == 0.0


def test_rows_with_errors_or_other_tasks_are_left_out():
    rows = [
        {"task": "asr", "text": "he was not ill", "reference": ["he was not ill"], "error": None},
        {"task": "asr", "text": None, "reference": "lost clip", "error": "not_audio"},
        {"task": "aac", "text": "a dog barks", "reference": "a cat meows", "error": None},
    ]
    result = asr_rows_wer(rows)
    assert result.items == 1 and result.wer == 0.0
    assert asr_rows_wer(rows[1:]) is None
