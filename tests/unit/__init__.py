"""Unit tests: nothing running needed."""
