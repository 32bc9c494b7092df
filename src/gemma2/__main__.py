import sys

from gemma2.cli import main

sys.exit(main())
