"""For devtools/measure_suite.sh only: a process a test starts with an environment of its own is measured too.

`coverage run` with `patch = subprocess` puts COVERAGE_PROCESS_CONFIG in os.environ, which a child inherits only when
it is started without `env=`; the tests start gunicorn (devtools.process.Server), `make run` and the other commands
with environments they build from nothing. Loaded with `pytest -p devtools.coverage_env` by the measuring script,
never by `make test`: a wrapper of Popen's constructor is a measuring device, not something the suite relies on.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

_popen_init = subprocess.Popen.__init__


def _init_with_coverage(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
    setting = os.environ.get("COVERAGE_PROCESS_CONFIG")
    env = kwargs.get("env")
    if setting is not None and env is not None and "COVERAGE_PROCESS_CONFIG" not in env:
        kwargs["env"] = {**env, "COVERAGE_PROCESS_CONFIG": setting}
    _popen_init(self, *args, **kwargs)


subprocess.Popen.__init__ = _init_with_coverage  # type: ignore[method-assign]  # the measuring device, see above
