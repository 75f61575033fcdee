"""Floor 3: uses of a finished run — predict, generate, evaluate, serve, export."""
