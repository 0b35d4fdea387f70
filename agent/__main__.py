"""``python -P -m agent ...``: how `outrider run` starts the agent.

``-P`` keeps the trainer's working directory (and any agent.py in it) off sys.path.
"""

from agent.cli.commands import main

if __name__ == "__main__":  # statistics worker processes import this module too (spawn)
    main(prog_name="outrider")
