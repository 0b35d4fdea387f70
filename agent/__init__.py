"""outrider's sidecar agent: receives probe records, stores them, does the expensive work."""
