"""Benchmarks: each writes JSON and prints a table for the README."""
