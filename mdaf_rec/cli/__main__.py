"""``python -m mdaf_rec.cli ...`` (what ``torchrun -m mdaf_rec.cli`` and TorchX run): the ``mdaf-rec`` command."""

import sys

from mdaf_rec.cli import main

sys.exit(main())
