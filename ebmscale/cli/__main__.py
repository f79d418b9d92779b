"""``python -m ebmscale.cli``: the same as the ``ebmscale`` console script."""
import sys

from ebmscale.cli import main

sys.exit(main())
