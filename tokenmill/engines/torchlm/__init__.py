"""The PyTorch engine (optional extra `tokenmill[torch]`): bf16 Llama-family models, continuous batching.

Import `tokenmill.engines.torchlm.engine` for the engine; `.tokenizer` loads only the vocabulary
(no torch import), for processes that validate requests without running the model.
"""
