"""Git integration (clean/smudge filter, diff and merge drivers) and the pre-commit hook.

Not built yet: protocol code and hook logic will live here, above the core and below the CLI.
"""
