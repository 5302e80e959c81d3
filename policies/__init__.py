"""moebits policies."""
