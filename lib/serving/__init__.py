"""A click's path: preprocessing, the embedding cache, the one decoding rule, prompts from requests and the prompt
sampler, the interactive segmenter, propagation through volumes, the ONNX Runtime backend and export, and the
versioned model store."""
