"""mvc benchmarks: `python -m bench`. Results and the commands that produced them: docs/benchmarks.md."""
