"""moebits sim."""
