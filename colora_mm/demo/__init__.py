"""The embedded CPU demo (``make demo``, ``tools/demo.py``): synthetic two-domain data,
the table and the figure. Training, merging and testing go through ``tools/``."""
