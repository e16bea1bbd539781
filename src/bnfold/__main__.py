"""``python -m bnfold``: the ``bnfold`` command without the console script."""

import sys

try:
    from .app.cli import main
except KeyboardInterrupt:  # Ctrl-C in the first milliseconds: still one line and exit 130 (see bnfold.app.cli.main)
    sys.stderr.write("interrupted; nothing was written\n")
    sys.exit(130)

sys.exit(main())
