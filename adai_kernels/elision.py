"""The exact beta1_prod elision (docs/design.md, "Eliding beta1_prod"): once every element of a
tensor has |b| <= 2^-25 (2^-54 for float64 state), 1 - b rounds to exactly 1, so the
bias correction m / (1 - b) is m bitwise and b no longer matters; b never grows again
(b' = b * beta1 with 0 <= beta1 <= 1). Such a tensor is "done": the update neither reads nor
writes its b. Each bucket keeps, per tensor, the max of |b| after the last step that wrote
it (`beta1_prod_max`, float32), and frees its b buffer once every tensor is done.

This module holds the rule (thresholds, the max), and the watch that frees a bucket's
buffer without synchronising with a GPU."""
from __future__ import annotations

import torch

# Largest |b| with 1 - b == 1 in the state dtype (round to nearest even): half an ulp of
# the numbers just below 1 is a tie that rounds up to 1.
THRESHOLDS = {torch.float32: 2.0**-25, torch.float64: 2.0**-54}


def threshold(state_dtype: torch.dtype) -> float:
    return THRESHOLDS[state_dtype]


def max_abs(b: torch.Tensor) -> torch.Tensor:
    """max |b| over the elements of `b` as a 0-dim float32 tensor on its device: NaN when an
    element is NaN, 0 when `b` is empty. A float64 max is rounded up to float32, so that
    `max <= threshold` says exactly what the float64 values say (2^-54 is a float32)."""
    if b.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=b.device)
    m = b.abs().amax()  # amax propagates NaN
    if m.dtype == torch.float32:
        return m
    m32 = m.float()
    # m32 < m only when rounding went down (NaN compares false and stays NaN)
    return torch.where(m32.double() < m, torch.nextafter(m32, torch.full_like(m32, torch.inf)),
                       m32)


def done(b_max: torch.Tensor, state_dtype: torch.dtype) -> torch.Tensor:
    """Per slot: whether the tensor is done (False for NaN), on the device."""
    return b_max <= threshold(state_dtype)


def ready_to_free(bucket, capturable: bool) -> bool:
    """Whether `bucket` may give back its beta1_prod buffer now: the elision is on, the
    buffer is there, no CUDA graph can hold its address (`capturable` off), and every
    tensor is known to be done."""
    if (capturable or bucket.beta1_prod_max is None or bucket.beta1_prod_freed
            or bucket.size == 0):
        return False
    return bucket.watch.look(bucket)


class DoneWatch:
    """Finds out, without a device-to-host synchronisation, whether every tensor of a
    bucket is done. On CPU the flags are read directly. On CUDA, `look` copies the flags to
    pinned memory (non_blocking) after an update and records an event; a later `look`
    whose event has completed reads that copy. The copy says something only about the
    bucket as it was then: any change of its slots (a parameter joining, state loaded)
    bumps the bucket's generation, which voids the copy."""

    def __init__(self):
        self._host = None
        self._event = None
        self._generation = -1

    def look(self, bucket) -> bool:
        """Whether every slot of `bucket` is known to be done, now or from an earlier copy.
        Call after the bucket's update."""
        b_max = bucket.beta1_prod_max
        if bucket.device.type == "cpu":
            return bool(done(b_max, bucket.state_dtype).all())
        if bucket.device.type != "cuda":
            return False  # no pinned copies and events to rely on: never freed there
        answer = False
        if self._event is not None and self._event.query():
            answer = (self._generation == bucket.generation
                      and bool(done(self._host, bucket.state_dtype).all()))
            self._event = None
        if self._event is None and not answer:
            if self._host is None or self._host.numel() != b_max.numel():
                self._host = self._pinned(b_max)
            self._host.copy_(b_max, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self._generation = bucket.generation
        return answer

    @staticmethod
    def _pinned(like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
