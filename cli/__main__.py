"""`python -m ldmole_cli`: the `ldmole` command."""

import sys

from ldmole_cli.main import main

sys.exit(main())
