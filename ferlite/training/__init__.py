"""The training part: the network, checkpoints and the ONNX export. Imports PyTorch; the runtime above never
imports this."""
