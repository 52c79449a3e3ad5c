"""Reading work-tree files as tensors plus verbatim bytes. Parse only, never execute."""
