"""Compression operations that produce commits (shed, prune, quantize, factorize, heal).

Not built yet: this package is where they will live, above the core and below the CLI.
"""
