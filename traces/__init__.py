"""moebits traces: the routing-trace format, importers, statistics, synthesis and capture."""

from moebits.traces.format import Phase, Trace, TraceError, TraceMeta, read_trace, write_trace

__all__ = ["Phase", "Trace", "TraceError", "TraceMeta", "read_trace", "write_trace"]
