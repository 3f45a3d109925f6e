"""``python -m jarvisd`` is the ``jarvisd`` command."""

import sys

from jarvisd.cli import main

sys.exit(main())
