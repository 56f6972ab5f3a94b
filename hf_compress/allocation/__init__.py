"""Allocate: turn per-layer (or per-column) sensitivity into a budget of bits that meets a target."""
