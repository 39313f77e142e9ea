"""pykernels.policy: chooses kernel variant, precision, batch size and threads
from SLO targets (installed from the top-level ``policy/`` folder)."""
