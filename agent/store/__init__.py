"""The run store: the source of truth, written before anything else sees a record."""
