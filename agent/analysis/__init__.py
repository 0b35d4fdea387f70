"""The analysis: summaries, representation statistics, maps, dashboards, off the receive thread."""
