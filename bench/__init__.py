"""Benchmarks that print JSON and always measure their baseline in the same run."""
