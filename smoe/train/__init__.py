"""Training sparse MoE language models: data, losses, the trainer, checkpoints, recipes, plots, export."""
