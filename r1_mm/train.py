"""``accelerate launch -m r1_mm.train RECIPE.yaml [key=value ...]``: the training entry point users launch.

The job itself lives in :mod:`r1_mm.jobs.train`; this module keeps the documented ``-m r1_mm.train``
path working."""

from r1_mm.jobs.train import main

if __name__ == "__main__":  # the same log lines as `r1-mm train`
    import logging
    import sys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
