"""The numerical ops the model families share, one file each, each with its torch reference.

    attention.py   softmax attention with typed metadata (dense, block-causal, varlen / windowed)
    rms_norm.py    RMSNorm (float32 statistics, the input dtype out)
    rope.py        rotary position embedding over a (frame, height, width) token grid
    modulate.py    adaLN modulation and the gated residual add

Kernel back-ends (Triton sources in the top-level ``kernels/``) plug in behind these functions by
name; the torch code here is what they are tested against.
"""
