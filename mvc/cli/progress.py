"""A tqdm progress bar for bytes and tensors, shown only on a terminal and without --quiet."""

from __future__ import annotations

import sys

from ..progress import Progress


class BarProgress(Progress):
    def __init__(self):
        self.bar = None
        self.tensors = 0
        self.text = ""

    def start(self, label, total_bytes, total_tensors=0, unit="B"):
        from tqdm import tqdm

        self.finish()
        if total_bytes <= 0:
            return
        self.tensors = 0
        self.text = ""
        scaled = unit == "B"
        self.bar = tqdm(total=total_bytes, desc=label, unit=unit, unit_scale=scaled, unit_divisor=1024,
                        file=sys.stderr, leave=False, dynamic_ncols=True)

    def advance(self, nbytes=0, tensors=0):
        if self.bar is not None:
            self.bar.update(nbytes)
            if tensors:
                self.tensors += tensors
                self._postfix()

    def note(self, text):
        self.text = text
        if self.bar is not None:
            self._postfix()
            self.bar.refresh()

    def _postfix(self):
        parts = ([f"{self.tensors} tensors"] if self.tensors else []) + ([self.text] if self.text else [])
        self.bar.set_postfix_str(", ".join(parts), refresh=False)

    def finish(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def make_progress(quiet: bool) -> Progress:
    if quiet or not sys.stderr.isatty():
        return Progress()
    return BarProgress()
