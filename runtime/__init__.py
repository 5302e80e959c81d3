"""moebits runtime."""
