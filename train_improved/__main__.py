"""`python -m train_improved` is `train` (also under torchrun)."""

from .cli import main

main()
