"""``python -m chatumm_kit`` is the ``chatumm`` command."""

import sys

from chatumm_kit.cli import main

sys.exit(main())
