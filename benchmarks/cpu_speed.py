"""CPU inference speed: gemma2 (bf16, int8, int4) against transformers (and llama.cpp when installed).

    python benchmarks/cpu_speed.py [--layers N] [--decode-tokens 128] [--skip prefill2048,ctx4096] [--json FILE]

The benchmark lives in the package (`gemma2 bench`); see gemma2/bench.py for what is measured.
"""

import sys

from gemma2.bench import main

if __name__ == "__main__":
    sys.exit(main())
