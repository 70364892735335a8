"""Train or fine-tune the NOTA model on Ray Train (`TorchTrainer`, DDP), as the seed's two stages did.

    python -m jobs.train --config configs/train-stage1.yaml [--set run.max_steps=2000] [--set run.num_workers=2]

One config (YAML, typed; unknown keys are errors) per stage: `model` (a preset or YAML, overrides, an
optional init checkpoint: stage 2 starts from stage 1's), `datasets` (training manifests, per-task
mixing weights and training prompts, a held-out validation manifest), `run` (steps or epochs, batch per
worker, accumulation, AMP, AdamW and its schedule, workers, GPU or CPU, seed, where checkpoints go) and
`logging` (TensorBoard by default, wandb when asked, offline mode supported).

Only the trained parameters learn (Q-Former, query tokens, projection, `ln_speech`/`ln_audio`, LoRA);
the loss is on the answer tokens and the end symbol alone. Checkpoints go through `ray.train.report` to
`run.storage_path` (any fsspec URL), one directory per checkpoint:

    model.safetensors   the trained parameters: `load_model(config, checkpoint=".../model.safetensors")`
    model.yaml          the model config it was trained with
    checkpoint.pth      the seed's `{"model": ..., "config": ..., "optimizer": ...}` layout (run.seed_checkpoint)
    train_state.pt      optimizer, schedule, gradient scaler, step and the loss history, for resuming
    validation.json     the validation metrics and predictions at that step, when validated there

A run resumes from its latest checkpoint after a worker failure (`run.max_failures` restarts) and when
the same command is run again (same `run.name` and `run.storage_path`): same step, same data order
(a pure function of the seed and the epoch), same prompts and dropout masks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jobs.command_line import module_entry
from jobs.ray_session import join_ray
from nota_model.overrides import parse_overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config (YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override, e.g. run.max_steps=100 or model.overrides.lora.r=16")
    parser.add_argument("--publish", metavar="PATH", help="train nothing: write the run's chosen checkpoint here "
                        "(lowest validation WER, else the latest), "
                        "in float16, as weights to ship (a preset's trained_weights)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported once the arguments parse: the training config (nota_model.training's optimizer settings) loads torch.
    from jobs import logs
    from jobs.training.config import load_train_config
    from jobs.training.driver import publish, run

    config = load_train_config(args.config, parse_overrides(args.set))
    logs.configure(os.environ.get("RAY_JOB_SUBMISSION_ID") or "train")
    if args.publish:
        print(json.dumps(publish(config, args.publish)), flush=True)
        return 0
    join_ray()
    summary = run(config)
    print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(module_entry(main))
