"""`python -m idla.cli`, the same as the `idla` command."""

import sys

from idla.cli.app import main

sys.exit(main())
