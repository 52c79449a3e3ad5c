"""A tqdm progress bar for bytes and tensors, shown only on a terminal and without --quiet."""

from __future__ import annotations

import sys

from ..progress import Progress


class BarProgress(Progress):
    def __init__(self):
        self.bar = None
        self.tensors = 0

    def start(self, label, total_bytes, total_tensors=0):
        from tqdm import tqdm

        self.finish()
        if total_bytes <= 0:
            return
        self.tensors = 0
        self.bar = tqdm(total=total_bytes, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                        file=sys.stderr, leave=False, dynamic_ncols=True)

    def advance(self, nbytes=0, tensors=0):
        if self.bar is not None:
            self.bar.update(nbytes)
            if tensors:
                self.tensors += tensors
                self.bar.set_postfix_str(f"{self.tensors} tensors", refresh=False)

    def finish(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def make_progress(quiet: bool) -> Progress:
    if quiet or not sys.stderr.isatty():
        return Progress()
    return BarProgress()
