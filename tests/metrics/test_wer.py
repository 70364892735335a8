import jiwer
import numpy as np
import pytest
from whisper_normalizer.english import EnglishTextNormalizer

from jobs.metrics.normalizer import EnglishNormalizer
from jobs.metrics.wer import EDITS, corpus_wer, edit_counts, normalize

# Texts the normalizer treats specially: numbers, currencies, contractions, titles, British spellings,
# fillers, brackets, symbols, non-ASCII letters and digits, odd whitespace.
TRICKY_TOKENS = [
    "twenty", "three", "one", "oh", "zero", "ones", "first", "twelfth", "sixties", "hundred", "thousand", "millions",
    "point", "five", "and", "a", "half", "double", "triple", "seven", "minus", "plus", "dollars", "pounds", "cents",
    "euro", "per", "cent", "percent", "$20", "£3.50", "€7", "¢5", "10%", "3.5", "1,000", "2nd", "1960s", "1", "1s",
    "0.07", "I'm", "won't", "can't", "isn't", "it's", "they're", "we'd", "you'll", "y'all", "gonna", "ma'am",
    "'s been", "'d done", "Mr.", "MRS", "Dr", "st.", "St", "Jr.", "colour", "organise", "theatre", "behaviour", "hmm",
    "mm", "Uh,", "um...", "[noise]", "<unk>", "(laughs)", "(", ")", "[", "]", "don ' t", "hello,", "world!", "¿qué?",
    "café", "naïve", "Œuvre", "straße", "½", "٣", "x²", "—", "--", "...", ".", "\u00a0", "\t", "  ", "\n", "😀",
]


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


def test_the_fast_normalizer_gives_the_librarys_output():
    library, fast = EnglishTextNormalizer(), EnglishNormalizer()
    rng = np.random.default_rng(16)
    plain_words = ["the", "cat", "sat", "kalo", "mine", "sand", "human", "stand", "hands", "number", "onetime"]
    texts = [" ".join(rng.choice(TRICKY_TOKENS + plain_words, rng.integers(0, 14))) for _ in range(6000)]
    texts += ["", " ", "Kalo mi ne.", "It is a quarter past two and a half.", "one oh one", "$20 million"]
    for text in texts:
        assert fast(text) == library(text), text


def test_edit_counts_are_jiwers_on_each_item():
    rng = np.random.default_rng(17)
    words = ["the", "cat", "sat", "on", "a", "mat", "twenty", "three", "isn't", "colour", "Mr.", "hmm", "café", "10%", ""]
    pairs = [(" ".join(rng.choice(words, rng.integers(0, 9))), " ".join(rng.choice(words, rng.integers(0, 9))))
             for _ in range(800)]
    counts = edit_counts(*zip(*pairs))
    for item, (reference, hypothesis) in enumerate(pairs):
        ref, hyp = normalize(reference), normalize(hypothesis)
        for unit, process in (("word", jiwer.process_words), ("char", jiwer.process_characters)):
            output = process([ref], [hyp])
            expected = (output.substitutions, output.deletions, output.insertions, output.hits)
            assert tuple(counts[f"{unit}_{edit}"][item] for edit in EDITS) == expected, (unit, reference, hypothesis)


def test_each_items_edits_add_up_to_the_corpus_counts():
    # Item 1: "sat" -> "sit" (1 S), "the" dropped (1 D); item 2: nothing to match, 2 words inserted (2 I).
    # Characters: "a" -> "i" (1 S), "the " dropped (4 D); item 2 inserts the 7 characters of "big dog".
    counts = edit_counts(["the cat sat", ""], ["cat sit", "big dog"])
    assert counts["word_substitutions"].tolist() == [1, 0] and counts["word_deletions"].tolist() == [1, 0]
    assert counts["word_insertions"].tolist() == [0, 2] and counts["word_hits"].tolist() == [1, 0]
    assert counts["char_substitutions"].tolist() == [1, 0] and counts["char_deletions"].tolist() == [4, 0]
    assert counts["char_insertions"].tolist() == [0, 7]
    result = corpus_wer(["the cat sat", ""], ["cat sit", "big dog"])
    assert (result.substitutions, result.deletions, result.insertions, result.reference_words) == (1, 1, 2, 3)
    assert result.wer == pytest.approx(4 / 3) and result.cer == pytest.approx(12 / 11)


def test_with_no_reference_character_cer_is_the_insertion_count_as_jiwer_gives_it():
    assert corpus_wer([""], ["ab"]).cer == 2
