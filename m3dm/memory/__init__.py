"""Memory banks: patch storage, projection, coreset selection, nearest-neighbour search and score maps."""
