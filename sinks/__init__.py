"""Where the agent sends what it receives (the JSONL run store lives in agent/store.py)."""
