import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from nota_model.config import QFormerConfig
from nota_model.qformer import QFormer, num_windows, pool_tokens, split_windows

SMALL = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


def test_windows_of_30_seconds_are_88_and_drop_the_last_frames():
    states = torch.randn(2, 1500, 6)
    windows = split_windows(states, 17, 17)
    assert windows.shape == (2 * 88, 17, 6) and num_windows(1500, 17, 17) == 88
    assert torch.equal(windows[0], states[0, :17])
    assert torch.equal(windows[87], states[0, 87 * 17 : 88 * 17])
    assert torch.equal(windows[88 + 5], states[1, 5 * 17 : 6 * 17])


def test_pooling_averages_runs_of_tokens_and_keeps_a_shorter_last_run():
    tokens = torch.arange(14.0).view(7, 2)
    assert torch.equal(pool_tokens(tokens, 1), tokens)
    assert pool_tokens(tokens, 2).tolist() == [[1.0, 2.0], [5.0, 6.0], [9.0, 10.0], [12.0, 13.0]]
    assert pool_tokens(tokens, 3).tolist() == [[2.0, 3.0], [8.0, 9.0], [12.0, 13.0]]


def test_parameter_names_are_the_lavis_ones():
    names = set(QFormer(SMALL, encoder_width=48).state_dict())
    layer = "bert.encoder.layer.1."
    expected = {
        "bert.embeddings.LayerNorm.weight",
        layer + "attention.self.query.weight",
        layer + "attention.self.key.bias",
        layer + "attention.output.dense.weight",
        layer + "attention.output.LayerNorm.bias",
        layer + "crossattention.self.key.weight",
        layer + "crossattention.self.value.bias",
        layer + "crossattention.output.LayerNorm.weight",
        layer + "intermediate_query.dense.weight",
        layer + "output_query.dense.bias",
        layer + "output_query.LayerNorm.weight",
    }
    assert expected <= names
    assert not any(".intermediate." in n or ".output.dense" in n and "attention" not in n for n in names)
    assert QFormer(SMALL, encoder_width=48).state_dict()[layer + "crossattention.self.key.weight"].shape == (32, 48)


def test_matches_the_blip2_qformer_of_transformers():
    """An independent implementation of the same network gives the same query outputs."""
    ours = QFormer(SMALL, encoder_width=48).eval()
    theirs = Blip2QFormerModel(
        Blip2QFormerConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            cross_attention_frequency=1, encoder_hidden_size=48, layer_norm_eps=1e-12,
        )
    ).eval()
    renamed = {}
    for key, value in ours.state_dict().items():
        key = key.removeprefix("bert.").replace("embeddings.LayerNorm", "layernorm")
        renamed[key.replace("attention.self.", "attention.attention.")] = value
    missing, unexpected = theirs.load_state_dict(renamed, strict=False)
    assert not unexpected and all(".intermediate." in k or ".output." in k for k in missing)
    queries, states = torch.randn(5, 1, 32), torch.randn(5, 17, 48)
    expected = theirs(query_embeds=queries, encoder_hidden_states=states).last_hidden_state
    torch.testing.assert_close(ours(queries, states), expected, rtol=1e-5, atol=1e-5)
