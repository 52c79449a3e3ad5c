"""Three-way merges: the engine (trees, files, tensors, elements) and the session (merge commits, conflict state)."""
