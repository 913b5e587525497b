"""train_improved: a PyTorch training runner whose checkpointing never loses training."""

__version__ = "0.1.0"
