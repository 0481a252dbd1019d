"""Generation engines implementing `orchard.protocols.Engine`: `torch_engine.TorchEngine` runs on CPU."""
