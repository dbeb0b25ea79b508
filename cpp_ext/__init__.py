"""deeprecon.cpp_ext: the fused NCC + ROI-L2 loss op."""
