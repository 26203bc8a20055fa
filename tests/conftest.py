"""Test-wide settings."""

import torch

# The models under test are tiny: one thread avoids OpenMP synchronisation costs that
# dominate small ops on a 2-core machine (measured 90x slower head sampling with 2
# threads while another process used the second core).
torch.set_num_threads(1)
