"""Handwritten digits: a small CNN on scikit-learn's 8x8 digits, with random shifts as augmentation.

    train --task examples/digits.py --metric accuracy --mode max
    train --task examples/digits.py --help            # its options: --width, --max-shift
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn


@dataclass
class Options:
    width: int = 32  # channels of the first convolution
    max_shift: int = 1  # pixels a training image may move in each direction


# train's options for this task, below anything given on the command line or in a config file
DEFAULTS = {"num_epochs": 12, "batch_size": 64, "lr": 3e-3, "warmup_steps": 20, "weight_decay": 0.01,
            "eval_interval": 50, "checkpoint_freq": 100}


class Digits(torch.utils.data.Dataset):
    def __init__(self, images, labels, max_shift: int = 0) -> None:
        self.images = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16  # 1 x 8 x 8, in [0, 1]
        self.labels = torch.tensor(labels)
        self.max_shift = max_shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image, s = self.images[i], self.max_shift
        if s:  # the runner seeds torch's generator per (seed, epoch, i): the same shift after a resume
            dx, dy = torch.randint(0, 2 * s + 1, (2,)).tolist()
            image = F.pad(image, (s, s, s, s))[:, dy:dy + 8, dx:dx + 8]
        return image, self.labels[i]


def datasets(options: Options):
    digits = load_digits()  # 1797 images that ship inside scikit-learn
    cut = len(digits.target) * 4 // 5  # the last fifth, other writers, is held out
    return (Digits(digits.images[:cut], digits.target[:cut], options.max_shift),
            Digits(digits.images[cut:], digits.target[cut:]))


def model(options: Options) -> nn.Module:
    w = options.width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * w * 4 * 4, 10),
    )


def loss(model: nn.Module, batch) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def metrics(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    images, labels = batch
    return {"accuracy": (model(images).argmax(1) == labels).float().mean()}
