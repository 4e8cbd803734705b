"""`python -m pipeline` is the `medxfer` command."""

import sys

from pipeline.cli import main

sys.exit(main())
