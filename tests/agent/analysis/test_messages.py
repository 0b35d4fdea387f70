"""A sink's alert as the analysis takes it: the rule event it feeds, and the entry it stores."""

from __future__ import annotations

from agent.analysis.messages import SinkAlarm


def test_a_sink_alert_names_its_rule_event_and_does_not_store_it() -> None:
    """``event`` picks the rule event (the series cap's is ``series_cap``) and is not stored."""
    alarm = SinkAlarm.from_sink(
        None,
        {"name": "prometheus_series_cap", "event": "series_cap", "severity": "warning",
         "message": "10000 series"},
    )  # fmt: skip
    assert alarm.run is None
    assert alarm.event == "series_cap"
    assert alarm.entry == {
        "kind": "alert",
        "name": "prometheus_series_cap",
        "severity": "warning",
        "message": "10000 series",
    }


def test_without_an_event_the_alert_name_is_the_event() -> None:
    """A failing sink's ``sink_failed`` feeds the rule event of the same name."""
    alarm = SinkAlarm.from_sink("run-1", {"name": "sink_failed", "severity": "error"})
    assert (alarm.run, alarm.event) == ("run-1", "sink_failed")
    assert "event" not in alarm.entry and alarm.entry["kind"] == "alert"
