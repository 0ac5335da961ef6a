"""Using what MAE learned: reconstructions, linear probe, fine-tuning, exports."""
