"""A small network without BatchNorm for tests/test_snapshots.py (a ``factory`` model): its gradient over a global
batch does not depend on how the batch is split between processes, so 1 and 2 processes train it alike up to float
rounding (as ``plain_net`` in tests/dist_train_worker.py)."""


def plain(num_classes: int = 10, in_chans: int = 1):
    import torch

    return torch.nn.Sequential(torch.nn.Conv2d(in_chans, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, num_classes))
