"""Alerts: rules over each run's metrics and events, cooldowns, destinations, webhooks."""
