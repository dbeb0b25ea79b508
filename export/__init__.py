"""deeprecon.export: turns trained networks into a model bundle (manifest, safetensors, graphs)."""
