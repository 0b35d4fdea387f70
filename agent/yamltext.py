"""YAML as the agent reads it (its config file, the built-in alert rules): safe loading only."""

from __future__ import annotations

from typing import Any

import yaml

#: libyaml's safe loader where PyYAML was built with it: ten times faster than the pure
#: Python one on the built-in rules, which every agent and `outrider` command parses at start
SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
