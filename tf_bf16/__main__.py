"""``python -m tf_bf16 COMMAND ...``: the same command line as the ``tf-bf16`` script."""

import sys

from tf_bf16.cli import run

if __name__ == "__main__":
    sys.exit(run())
