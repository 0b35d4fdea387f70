"""Where the agent sends what it receives; the JSONL run store (agent/store/) comes first."""
