"""``python -m imageragturbo.cli``: the `imageragturbo` command."""

import sys

from imageragturbo.cli.main import main

sys.exit(main())
