"""``python -m lora_param.mnist``: the reference pipeline's command line."""

import sys

from .cli import main

sys.exit(main())
