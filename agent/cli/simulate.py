"""``outrider simulate``: a synthetic training run fed to an agent, to try dashboards,
sinks, alerts and webhooks without a trainer or a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from agent.cli import launcher
from agent.config import AgentConfig
from agent.simulation import FAILURES
from probe import protocol

#: seconds the stalled trainer stays quiet beyond the rule's threshold: the rule is checked on
#: the agent's beat, and a margin keeps a loaded machine from ending the stall just short of it
STALL_MARGIN = 5.0


def _failures_help() -> str:
    lines = []
    for name, failure in FAILURES.items():
        lines.append(f"  {name:<11} {failure.does:<44} {failure.raises or 'no warning'}")
    return "\n".join(lines)


def stall_seconds(config: AgentConfig) -> float:
    """How long the `stall` failure stops logging: past the config's `stalled` threshold."""
    rule = config.alerts.rules.get("stalled")
    after = getattr(rule, "after_seconds", 300.0)
    return float(after) + STALL_MARGIN


def trainer_command(
    failure: str, steps: int, steps_per_second: float, at: int | None, seed: int, stall: float
) -> list[str]:
    """The simulated trainer, started with ``python -P`` like the agent."""
    return [
        sys.executable,
        "-P",
        "-m",
        "agent.simulation",
        "--failure",
        failure,
        "--steps",
        str(steps),
        "--steps-per-second",
        str(steps_per_second),
        "--seed",
        str(seed),
        "--stall-seconds",
        str(stall),
        *(["--at", str(at)] if at is not None else []),
    ]


def simulate_command() -> click.Command:
    """The `simulate` command; built on call, as its options are `agent.cli.commands`' own."""
    from agent.cli.commands import config_options, load_config, resolve_runs_dir, runs_dir_option
    from agent.cli.dashboard import dashboard_option, dashboard_settings

    @click.command(
        help=f"""Feed an agent a synthetic training run, healthy or broken at --at.

The run goes through the real probe and a real agent, so dashboards, sinks,
alerts and webhooks can be tried without a trainer or a GPU. It logs loss,
lr, grad_norm, step_time_seconds and tokens_per_second every step, val/loss
and a 64-d feature batch (`hidden`) every 50 steps, and the event
`failure_injected` at the failure's step.

\b
--failure       what it does                                 alert it raises
{_failures_help()}
\b
`stall` is quiet for the config's `stalled` after_seconds plus {STALL_MARGIN:.0f} s
(300 s by default, so about 5 minutes). A job's `straggler` needs several
ranks and a job aggregator and is not simulated.

\b
  outrider simulate --failure spike            # own agent, default sinks
  outrider simulate --endpoint tcp://127.0.0.1:9500 --failure nan
  outrider show latest                         # ... ALERTS
"""
    )
    @click.option(
        "--failure",
        type=click.Choice(list(FAILURES)),
        default="healthy",
        show_default=True,
        help="What goes wrong (above).",
    )
    @click.option("--steps", type=click.IntRange(min=1), default=2000, show_default=True)
    @click.option(
        "--steps-per-second",
        type=click.FloatRange(min=0, min_open=True),
        default=20.0,
        show_default=True,
        help="Pace of the simulated steps.",
    )
    @click.option(
        "--at", type=click.IntRange(min=0), help="Step the failure starts [default: half-way]."
    )
    @click.option("--seed", type=int, default=0, show_default=True, help="Noise seed.")
    @click.option("--run-id", help="Run id to use (default: a new timestamped id).")
    @click.option(
        "--endpoint",
        help="Feed this already-running agent (e.g. tcp://127.0.0.1:9500, or what "
        "`outrider agent` printed) instead of starting one.",
    )
    @click.option("-q", "--quiet", is_flag=True, help="No outrider lines on stderr.")
    @runs_dir_option
    @dashboard_option
    @config_options
    def simulate(
        failure: str,
        steps: int,
        steps_per_second: float,
        at: int | None,
        seed: int,
        run_id: str | None,
        endpoint: str | None,
        quiet: bool,
        runs_dir: Path | None,
        dashboard: str | None,
        config_path: Path | None,
        sinks: str | None,
    ) -> None:
        if at is not None and at >= steps and failure != "healthy":
            raise click.BadParameter(
                f"the run has {steps} steps (0..{steps - 1})", param_hint="--at"
            )
        config = load_config(config_path, sinks)
        command = trainer_command(failure, steps, steps_per_second, at, seed, stall_seconds(config))
        if endpoint is not None:
            sys.exit(_feed(endpoint, run_id, command))
        agent_args = ["--config", str(config_path.resolve())] if config_path else []
        if sinks is not None:
            agent_args += ["--sinks", sinks]
        board = dashboard_settings(config, dashboard)
        if dashboard is not None:
            agent_args += ["--dashboard", dashboard]
        status = launcher.run(
            command,
            runs_dir=resolve_runs_dir(runs_dir, config),
            agent_args=agent_args,
            run_id=run_id,
            quiet=quiet,
            require_agent=True,
            dashboard_url=launcher.dashboard_url(board),
            close_allowance=config.sink_close_timeout
            + config.stats.close_timeout
            + launcher.CLOSE_SLACK,
        )
        sys.exit(status)

    return simulate


def _feed(endpoint: str, run_id: str | None, command: list[str]) -> int:
    """The simulated trainer alone, its probe pointed at a running agent."""
    env = dict(os.environ)
    env.pop(protocol.ENV_DISABLED, None)
    env[protocol.ENV_ENDPOINT] = endpoint
    if run_id is not None:
        env[protocol.ENV_RUN_ID] = run_id
    return launcher.exit_code(subprocess.run(command, env=env, check=False).returncode)
