"""`qwenlab bench`: decode and prefill speed, memory and load time of qwenlab beside HF transformers, in one run."""
