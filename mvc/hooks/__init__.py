"""Hooks into other tools: Git (``git/``: pointer, pkt-line, clean/smudge filter, diff and merge drivers,
Git-history walks) and the pre-commit weight-hash manifest (``weighthash``)."""
