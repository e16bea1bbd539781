"""``python -m bnfold``: the ``bnfold`` command without the console script."""

import sys

from .cli import main

sys.exit(main())
