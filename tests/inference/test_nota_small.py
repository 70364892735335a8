"""NOTA-small with the weights it ships with, end to end: trained here (configs/nota-small-*.yaml), loaded by
name alone, run by the Ray job over real read speech it never heard, scored; the job's rows are the model's
own greedy answers. One number guards the whole train -> checkpoint -> job -> score stack."""

import pytest

from jobs.infer import parse_args, run
from nota_model import load_audio, load_config, load_model
from nota_model.long_form import generate_pieces
from nota_model.packs import build
from nota_model.segment import plan_pieces
from tests.inference.test_infer import read_rows

pytestmark = pytest.mark.real_weights

# The LibriVox sample's WER the shipped weights reach (49.3 %, nota_model/weights/nota-small.md), with room for a
# few words decoded otherwise on another CPU's float rounding. The target (30 %) is not reached yet.
LIBRIVOX_WER_CEILING = 0.60


@pytest.fixture(scope="module")
def packs() -> None:
    build("whisper-base")
    build("smollm2-135m-instruct")


def test_the_job_transcribes_librivox_with_the_shipped_weights_as_the_model_does_alone(local_ray, packs, tmp_path):
    summary = run(parse_args(["--manifest", "manifests/librivox-sample.yaml", "--model", "nota-small",
                              "--output", str(tmp_path / "out"), "--batch-size", "2"]))
    assert summary["random_weights"] == [] and summary["errors"] == 0 and summary["items"] == 5
    (group,) = summary["groups"]
    assert group["quality"]["wer"] <= LIBRIVOX_WER_CEILING
    config = load_config("nota-small")
    model = load_model(config, device="cpu").model
    for row in read_rows(tmp_path / "out"):
        clip = load_audio(row["audio"], config.audio, whole=True)
        pieces = plan_pieces(clip.waveform, row["task"], config.audio.max_seconds).pieces
        alone = generate_pieces(model, [clip], [row["prompt"]], [pieces], 1, config.decoding)
        assert row["text"] == alone.answers[0].text, row["id"]
