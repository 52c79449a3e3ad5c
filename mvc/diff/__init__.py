"""What changed: by id between trees (trees), per-tensor statistics (stats), portable binary patches (patch)."""
