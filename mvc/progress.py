"""Progress reporting interface. The core reports; only the CLI renders."""

from __future__ import annotations


class Progress:
    """Receives counts of bytes and tensors as work proceeds. The base class ignores them."""

    def start(self, label: str, total_bytes: int, total_tensors: int = 0, unit: str = "B") -> None:
        """*unit* "B": *total_bytes* counts bytes; any other unit (``layer``) counts those."""

    def advance(self, nbytes: int = 0, tensors: int = 0) -> None:
        pass

    def note(self, text: str) -> None:
        """Where the work is, in words (``layer 3/16, 1,840 tokens/s, 1.1 GiB``)."""

    def finish(self) -> None:
        pass


NULL = Progress()
