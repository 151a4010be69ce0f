"""Tiny offline models for the CPU demo and tests."""
