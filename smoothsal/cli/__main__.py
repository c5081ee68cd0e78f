"""`python -m smoothsal.cli …` (as under torchrun: `torchrun … -m smoothsal.cli train-surrogate …`)."""

import sys

from . import main

sys.exit(main())
