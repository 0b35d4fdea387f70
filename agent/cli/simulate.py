"""``outrider simulate``: a synthetic training run fed to an agent, to try dashboards,
sinks, alerts and webhooks without a trainer or a GPU."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import click

from agent.cli import launcher
from agent.config import AgentConfig
from agent.failures import FAILURES
from probe import protocol
from probe.identity import new_run_id

#: seconds the stalled trainer stays quiet beyond the rule's threshold: the rule is checked on
#: the agent's beat, and a margin keeps a loaded machine from ending the stall just short of it
STALL_MARGIN = 5.0
#: node agents of a simulated job: the ranks are split between them, the straggler on the last
JOB_NODES = 2
#: where the other nodes' run stores go, under the runs directory (node 0 uses it directly)
NODES_DIR = "nodes"


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
    failure: str,
    steps: int,
    steps_per_second: float,
    at: int | None,
    seed: int,
    stall: float,
    *node: str,
) -> list[str]:
    """The simulated trainer, started with ``python -P`` like the agent; ``node``: the options
    that make it one node of a job (``job_node_options``)."""
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
        *node,
    ]


def job_nodes(ranks: int) -> list[range]:
    """The global ranks of each node of a simulated job, in node order."""
    per_node = -(-ranks // JOB_NODES)  # ceil
    return [range(first, min(first + per_node, ranks)) for first in range(0, ranks, per_node)]


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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
(300 s by default, so about 5 minutes). `straggler` runs a job: --ranks
processes (default 4) split over {JOB_NODES} node agents (`outrider run --aggregator`)
that forward to a job aggregator beside node 0; the last rank's compute
section is twice as slow from --at, and the aggregator's `straggler` alert
names it (3 windows of stats.window_steps after --at) in the job view,
`outrider show jobs/<run id>`.

\b
  outrider simulate --failure spike            # own agent, default sinks
  outrider simulate --endpoint tcp://127.0.0.1:9500 --failure nan
  outrider simulate --failure straggler --ranks 8
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
    @click.option(
        "--ranks",
        type=click.IntRange(min=1),
        help="Ranks of a simulated job (straggler only) [default: 4].",
    )
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
        ranks: int | None,
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
        job = FAILURES[failure].ranks > 1
        if ranks is not None and not job:
            raise click.BadParameter(
                "only the straggler failure runs several ranks", param_hint="--ranks"
            )
        world = (ranks or FAILURES[failure].ranks) if job else 1
        if job and world < 2:
            raise click.BadParameter("a straggler needs at least 2 ranks", param_hint="--ranks")
        if job and endpoint is not None:
            raise click.BadParameter(
                f"{failure} starts its own node agents and job aggregator", param_hint="--endpoint"
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
        if world > 1:
            sys.exit(
                _job(
                    command,
                    world,
                    resolve_runs_dir(runs_dir, config),
                    run_id or new_run_id(),
                    agent_args,
                    quiet,
                )
            )
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


def _job(
    command: list[str],
    ranks: int,
    runs_dir: Path,
    run_id: str,
    agent_args: list[str],
    quiet: bool,
) -> int:
    """A job on this machine: one `outrider run` per node, each a node agent forwarding to the
    job aggregator that node 0 serves on a free loopback port; the worst node's status."""
    from agent.cli.commands import resolve_runs_dir

    where = f"127.0.0.1:{free_loopback_port()}"
    nodes = job_nodes(ranks)
    slow_rank = ranks - 1

    def say(message: str) -> None:
        if not quiet:
            click.echo(f"outrider: {message}", err=True)

    say(
        f"simulated job {run_id}: {ranks} ranks on {len(nodes)} node agents, job aggregator at "
        f"{where}; rank {slow_rank} (node{len(nodes) - 1}) is the straggler"
    )
    processes: list[subprocess.Popen[bytes]] = []
    for index, node in enumerate(nodes):
        node_runs = runs_dir if index == 0 else runs_dir / NODES_DIR / f"node{index}"
        ranks_option = ["--ranks", str(ranks), "--first-rank", str(node.start)]
        trainer = [*command, *ranks_option, "--local-ranks", str(len(node))]
        trainer += ["--slow-rank", str(slow_rank)]
        processes.append(
            subprocess.Popen(
                [
                    sys.executable, "-P", "-m", "agent", "run", "--runs-dir", str(node_runs),
                    "--run-id", run_id, "--host", f"node{index}", "--aggregator", where,
                    "--serve-aggregator" if index == 0 else "--no-serve-aggregator",
                    "--require-agent", *(["-q"] if quiet else []), *agent_args,
                    *([] if index == 0 else ["--dashboard", "off"]), "--", *trainer,
                ]
            )
        )  # fmt: skip
    statuses = [launcher.exit_code(status) for status in launcher.wait_forwarding(processes)]
    where_flag = "" if runs_dir == resolve_runs_dir(None) else f" --runs-dir {runs_dir}"
    say(f"job view: outrider show jobs/{run_id}{where_flag}")
    return max(statuses)


def _feed(endpoint: str, run_id: str | None, command: list[str]) -> int:
    """The simulated trainer alone, its probe pointed at a running agent."""
    env = dict(os.environ)
    env.pop(protocol.ENV_DISABLED, None)
    env[protocol.ENV_ENDPOINT] = endpoint
    if run_id is not None:
        env[protocol.ENV_RUN_ID] = run_id
    return launcher.exit_code(subprocess.run(command, env=env, check=False).returncode)
