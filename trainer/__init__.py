"""deeprecon.trainer: network definitions, data sets, losses and training loops (PyTorch)."""
