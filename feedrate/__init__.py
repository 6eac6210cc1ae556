"""feedrate: time the data path of a training loop and find the loader that keeps the accelerator busy.

The shared core lives here (storage, the CIFAR-10 source, progress bars, errors); the user-facing parts
are the top-level packages `shardgen`, `loaders`, `report` and the script `train.py`.
"""

__version__ = "0.1.0"
