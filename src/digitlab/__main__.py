"""`python -m digitlab`, the same as the `digitlab` command."""
import sys

from .cli import main

sys.exit(main())
