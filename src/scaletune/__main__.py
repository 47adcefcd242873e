"""`python -m scaletune ...` (and so `accelerate launch -m scaletune train run.yaml`)."""

import sys

from .cli import main

sys.exit(main())
