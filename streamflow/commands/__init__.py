"""Command groups that live in their own modules; each registers itself on `cli.app`.

`streamflow.cli` imports this package at its end, after `app` and the shared helpers
(`_edge`, `_choose`, `_open`, `_print_json`, `CliError`, ...) exist. Add a module here
and import it below to add commands without touching cli.py.
"""

import streamflow.commands.chaos
import streamflow.commands.dashboard
import streamflow.commands.lifecycle
import streamflow.commands.prune  # noqa: F401
from streamflow.commands import operator  # noqa: F401
