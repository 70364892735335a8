"""Training the NOTA model on Ray Train: `config` (TrainConfig, load_train_config), `data` (manifests to rows,
rows to clips), `worker` (each worker's loop and checkpoints), `logger` (rank 0's metrics), `driver` (`run`,
and `train_worker`, what Ray Train runs on each worker). `python -m jobs.train` is the command line."""
