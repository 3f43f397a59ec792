"""A long soak of the Procfile's server: `python bench/soak.py --help` (the harness is devtools/soak.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.soak import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
