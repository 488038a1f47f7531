"""`python -m fastprerl ...`: the command line (fastprerl/cli.py), also as torchrun's module:
`torchrun --standalone --nproc_per_node=2 -m fastprerl train CONFIG` (see fastprerl/distributed.py)."""
import sys

from .cli import main

sys.exit(main())
