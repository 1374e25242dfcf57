"""`python -m moe_lens ...` is the `moe-lens` command; `torchrun ... -m moe_lens train ...` runs it once per rank."""
import sys

from moe_lens.cli import main

sys.exit(main())
