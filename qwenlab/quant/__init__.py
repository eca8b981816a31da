"""NVFP4: the codec (FP4 E2M1 values, FP8 E4M3 block scales, FP32 tensor scale), checkpoint formats and the
quantized linear. Below model/: the loader calls it; it imports nothing of qwenlab but the top-level helpers."""
