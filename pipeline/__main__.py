import sys

from pipeline.cli import main

if __name__ == "__main__":  # Dask and torchrun workers may import this module
    sys.exit(main())
