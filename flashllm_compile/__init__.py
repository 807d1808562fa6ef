"""flashllm_compile: a torch.compile backend for unstructured-sparse LLM linears."""
