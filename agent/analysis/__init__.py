"""The analysis: summaries, representation statistics, maps and dashboards, off the receive thread."""
