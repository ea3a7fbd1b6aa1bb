"""Support code of the test suite (not installed)."""
