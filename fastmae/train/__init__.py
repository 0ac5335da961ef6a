"""Pretraining: config, optimizer, schedule, training loop, checkpoints, distributed."""
