"""Progress reporting interface. The core reports; only the CLI renders."""

from __future__ import annotations


class Progress:
    """Receives counts of bytes and tensors as work proceeds. The base class ignores them."""

    def start(self, label: str, total_bytes: int, total_tensors: int = 0) -> None:
        pass

    def advance(self, nbytes: int = 0, tensors: int = 0) -> None:
        pass

    def finish(self) -> None:
        pass


NULL = Progress()
