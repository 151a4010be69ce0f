"""`python -m openrlhf_sapo.eval`: see `openrlhf_sapo.eval`."""

import sys

from openrlhf_sapo.eval import main

if __name__ == "__main__":
    sys.exit(main())
