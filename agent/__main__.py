"""``python -P -m agent ...``: how `outrider run` starts the agent without the trainer's cwd on sys.path."""

from agent.cli import main

main(prog_name="outrider")
