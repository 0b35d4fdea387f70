"""``python -P -m agent ...``: how `outrider run` starts the agent.

``-P`` keeps the trainer's working directory (and any agent.py in it) off sys.path.
"""

from agent.cli import main

main(prog_name="outrider")
