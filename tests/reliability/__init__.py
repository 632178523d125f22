"""Reliability and security suite (issue 7): safe loading, clear errors, atomic and concurrent
store, resumability, numerical faults, determinism, property tests."""
