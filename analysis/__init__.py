"""moebits analysis."""
