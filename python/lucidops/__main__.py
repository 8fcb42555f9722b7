"""``python -m lucidops ...``: the same command line as the ``lucidops`` script, for
environments where the script's directory is not on PATH."""

import sys

from lucidops.cli import main

if __name__ == "__main__":
    sys.exit(main())
