"""The live web dashboard: runs, one run, compare, alerts and export pages over a runs
directory, served read-only by a process of its own beside the agent."""
