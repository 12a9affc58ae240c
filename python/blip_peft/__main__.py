"""`python -m blip_peft`: the `blip-peft` command."""

import sys

from blip_peft.cli import main

sys.exit(main())
