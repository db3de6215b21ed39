"""HGRN2 pretraining: config (``pretrain.config``), engines (``pretrain.engine``), the loop (``pretrain.train``).

The single-process path (CPU or one GPU) lives here; ``pretrain.parallel`` adds distributed engines
behind the same ``TrainingEngine`` seam. Importing this package imports neither DeepSpeed nor megatron.
"""
