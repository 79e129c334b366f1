"""Local and demo helpers: a Label Studio of our own (``lsserver``), ``quickstart``, the
synthetic shapes the demo model was trained on. Nothing in the pipeline imports them."""
