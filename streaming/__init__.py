"""Memory-to-memory detector streaming: wire format, sources, the Data Streaming Node, consumers."""
