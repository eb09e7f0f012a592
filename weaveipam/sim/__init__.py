"""Deterministic simulation of many allocators over a faulty network."""
