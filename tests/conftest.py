"""Shared test settings: a bounded number of CPU threads and a headless matplotlib."""
import os

os.environ.setdefault('MPLBACKEND', 'Agg')

import torch  # noqa: E402

# The suite runs on small CPU machines, often beside other work: a few threads each.
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
