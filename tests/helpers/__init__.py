"""Test-only helpers: code the tests and benchmarks share, kept out of the library."""
