"""Ingest: the socket, decoding with hard limits, rejection counters, sequence accounting."""
