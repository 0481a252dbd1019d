"""Generation engines implementing `orchard.protocols.Engine`: `torch_engine.TorchEngine` (CPU, or a GPU
when the worker has one) and `vllm.VLLMEngine` (GPUs; vLLM imported only when one is built)."""
