"""The job tier: node agents forward to one aggregator, which owns the job's view."""
