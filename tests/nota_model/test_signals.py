"""An answer's signals and flags (nota_model.signals): the compression ratio, the mean token log-probability as
greedy decoding chose the tokens, the token limit, and the flags the config's thresholds raise."""

import pytest
import torch

from nota_model.config import DecodingConfig, SignalsConfig
from nota_model.long_form import generate_pieces
from nota_model.signals import AnswerSignals, PieceScore, answer_signals, compression_ratio, flags
from tests.conftest import make_clip

SENTENCE = "And Mr. John Dashwood had then leisure to consider how much there might be prudently in his power to do for them."


def test_a_looping_answer_compresses_past_whispers_threshold_and_a_sentence_does_not():
    assert compression_ratio("the speech is not available " * 8) > SignalsConfig().repetition_compression_ratio
    assert compression_ratio(SENTENCE) < SignalsConfig().repetition_compression_ratio
    assert compression_ratio("") is None and compression_ratio("  ") is None


def test_an_items_mean_log_probability_weighs_its_pieces_by_their_scored_tokens():
    stopped = PieceScore("a b c", output_tokens=3, logprob_sum=-3.0, token_limit=False)  # 3 tokens and the stop token
    cut = PieceScore("d " * 5, output_tokens=5, logprob_sum=-1.0, token_limit=True)  # 5 tokens, no stop token
    signals = answer_signals([stopped, cut])
    assert signals.mean_logprob == pytest.approx(-4.0 / 9)
    assert signals.compression_ratio == compression_ratio("d " * 5) and signals.token_limit
    assert answer_signals([stopped, PieceScore("e", 1, None, False)]).mean_logprob is None  # a piece without one
    assert answer_signals([]) == AnswerSignals(None, None, False)  # audio that never reached the model


def test_each_flag_follows_its_threshold():
    config = SignalsConfig(low_confidence_logprob=-0.5, repetition_compression_ratio=2.0)
    assert flags(AnswerSignals(-0.4, 1.9, False), 0.8, config) == []
    assert flags(AnswerSignals(-0.6, 2.1, True), 0.8, config) == ["repetition", "token_limit", "low_confidence"]
    assert flags(AnswerSignals(None, None, False), 0.0, config) == ["no_speech"]
    assert flags(AnswerSignals(None, None, False), None, config) == []  # captioning: the VAD did not listen


def test_greedy_decodings_log_probabilities_are_those_of_the_models_own_scores(tiny):
    """The sum the decoding records is the answer's (and its stop token's) log-probability under the model, as a
    forward over the prompt and the answer gives it."""
    model = tiny.model
    clip, prompt = make_clip(2.0), model.prompt_for("asr")
    decoding = DecodingConfig(num_beams=1, max_new_tokens=4, min_new_tokens=0)  # no token masked: the raw scores
    output = model.generate([clip], [prompt], decoding)
    answer = output.token_ids[0] + ([model.end_token_id] if output.output_tokens[0] < decoding.max_new_tokens else [])
    with torch.inference_mode():
        embeds = model.prompt_sequence(model.audio_tokens([clip])[0], prompt)
        answer_embeds = model.llama_model.get_input_embeddings()(torch.tensor(answer))
        logits = model.llama_model(inputs_embeds=torch.cat([embeds, answer_embeds])[None]).logits[0].float()
    scores = torch.log_softmax(logits[len(embeds) - 1 : -1], -1)
    assert output.logprob_sums[0] == pytest.approx(scores[range(len(answer)), answer].sum().item(), abs=1e-3)


def test_beam_search_gives_no_log_probability_and_an_answer_cut_at_the_limit_is_flagged(tiny):
    model = tiny.model
    clip = make_clip(2.0)
    prompt, pieces = model.prompt_for("asr"), [[(0, len(clip.waveform))]]
    beam = generate_pieces(model, [clip], [prompt], pieces, 1, DecodingConfig(num_beams=2, max_new_tokens=3)).answers[0]
    assert beam.signals.mean_logprob is None
    cut = generate_pieces(model, [clip], [prompt], pieces, 1, DecodingConfig(num_beams=1, max_new_tokens=3, min_new_tokens=3)).answers[0]
    assert cut.output_tokens == 3 and cut.signals.token_limit and cut.signals.mean_logprob < 0
    assert "token_limit" in flags(cut.signals, 1.0, model.config.signals)
