"""Implementations of the `sortedrl` commands that need torch (imported lazily by the CLI)."""
