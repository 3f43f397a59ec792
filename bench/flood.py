"""Connection floods against the Procfile's server: `python bench/flood.py --help` (the harness is devtools/flood.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.flood import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
