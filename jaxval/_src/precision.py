"""The one matmul precision of jaxval's float32 products.

``None`` is XLA's default: exact float32 on CPU. On GPUs whose default float32 matmul is TF32, wrap calls
in ``jax.default_matmul_precision("highest")`` when the last digit matters (the scoring engine takes its
own ``precision=`` argument, default ``"highest"``).
"""

MATMUL = None
