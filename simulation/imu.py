"""The seglearn watch IMU set as a naturally federated data set: one device per subject.

seglearn (BSD-3) ships ``watch_dataset.npy``: 140 six-axis series (accelerometer + gyroscope of a
smartwatch, 50 Hz) of 7 shoulder-physiotherapy exercises, 10 subjects x 14 series. Each series
is cut into windows of ``WINDOW`` samples (stride ``WINDOW // 2``); a window travels flat and
channel-major (``[6 * WINDOW]``: all of channel 0, then channel 1, ...), the layout the zoo's
``cnn1d`` reshapes to ``[6, WINDOW]``.

Train/test is per subject and in time: the first ``1 - test_fraction`` of every series gives
the subject's training windows, the rest its test windows (no window straddles the cut, so no
sample is in both). The central test split is the union of every subject's held-out windows.
Channels are standardised with the training windows' mean and standard deviation.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CHANNELS", "NUM_CLASSES", "SUBJECTS", "WINDOW", "load_imu"]

CHANNELS = 6
WINDOW = 64  # 1.28 s at 50 Hz
NUM_CLASSES = 7
SUBJECTS = 10

Split = tuple[np.ndarray, np.ndarray]


def _windows(series: np.ndarray) -> np.ndarray:
    """``[n, WINDOW * CHANNELS]`` channel-major windows of a ``[time, CHANNELS]`` series."""
    stride = WINDOW // 2
    starts = range(0, len(series) - WINDOW + 1, stride)
    out = np.stack([series[s : s + WINDOW].T.reshape(-1) for s in starts]) if starts else None
    return out if out is not None else np.zeros((0, WINDOW * CHANNELS), np.float32)


def load_imu(num_devices: int, test_fraction: float) -> tuple[tuple[Split, ...], Split]:
    """Per-device training splits (subjects dealt round-robin over ``num_devices``) and the
    central test split; x float32 ``[n, 384]``, y int64 in ``[0, 7)``."""
    if not 1 <= num_devices <= SUBJECTS:
        raise ValueError(
            f"dataset 'imu' has {SUBJECTS} subjects, one device each: --devices must be in "
            f"[1, {SUBJECTS}], got {num_devices}"
        )
    try:
        from seglearn.datasets import load_watch
    except ImportError:
        raise ValueError("dataset 'imu' needs the seglearn package: pip install seglearn") from None
    raw = load_watch()
    subjects = np.asarray(raw["subject"], dtype=np.int64)
    labels = np.asarray(raw["y"], dtype=np.int64)
    per_subject: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    test_x: list[np.ndarray] = []
    test_y: list[np.ndarray] = []
    for series, label, subject in zip(raw["X"], labels, subjects, strict=True):
        s = np.asarray(series, dtype=np.float32)
        if s.ndim != 2 or s.shape[1] != CHANNELS:
            raise ValueError(f"watch series of shape {s.shape}, expected [time, {CHANNELS}]")
        cut = int(len(s) * (1 - test_fraction))
        train_w, test_w = _windows(s[:cut]), _windows(s[cut:])
        xs, ys = per_subject.setdefault(int(subject), ([], []))
        xs.append(train_w)
        ys.append(np.full(len(train_w), label, np.int64))
        test_x.append(test_w)
        test_y.append(np.full(len(test_w), label, np.int64))
    order = sorted(per_subject)
    train = [(np.concatenate(per_subject[s][0]), np.concatenate(per_subject[s][1])) for s in order]
    everything = np.concatenate([x for x, _ in train]).reshape(-1, CHANNELS, WINDOW)
    mean = everything.mean(axis=(0, 2)).astype(np.float32)[None, :, None]
    std = everything.std(axis=(0, 2)).astype(np.float32)[None, :, None] + 1e-6

    def scale(x: np.ndarray) -> np.ndarray:
        z = (x.reshape(-1, CHANNELS, WINDOW) - mean) / std
        return np.ascontiguousarray(z.reshape(len(x), -1), dtype=np.float32)

    devices: list[tuple[list[np.ndarray], list[np.ndarray]]] = [
        ([], []) for _ in range(num_devices)
    ]
    for i, (x, y) in enumerate(train):
        devices[i % num_devices][0].append(scale(x))
        devices[i % num_devices][1].append(y)
    parts = tuple((np.concatenate(xs), np.concatenate(ys)) for xs, ys in devices)
    return parts, (scale(np.concatenate(test_x)), np.concatenate(test_y))
