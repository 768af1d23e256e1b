import sys

from mimo_ckpt.cli.commands import main

sys.exit(main())
