"""Reading stored runs back out: export, compare, replay, reports."""
