"""Remotes: object storage that a team shares (file:// directories now; S3-compatible buckets next)."""
