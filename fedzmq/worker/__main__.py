import os
import sys

# One BLAS thread unless told otherwise: daemons share their machine, and idle BLAS threads busy-wait.
# (Set before numpy or torch is imported, which read these once.)
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

from .daemon import main  # noqa: E402

sys.exit(main())
