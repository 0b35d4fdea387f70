"""The aggregation tier: node agents forward summaries to one job aggregator over TCP."""
