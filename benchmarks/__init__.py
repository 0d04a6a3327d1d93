"""The benchmark suite: opendelta side by side with PEFT, full fine-tuning and the bare backbone.

Run ``python -m benchmarks`` (``--smoke`` for a tiny run, ``--device cuda``, ``--json PATH``).
Every figure is a ratio of configurations measured in one process, interleaved round by round.
"""

import warnings

from opendelta.utils.logging import quiet_known_import_noise

quiet_known_import_noise()  # torchao's known import warnings (through PEFT) on every benchmark's stderr
# transformers' deprecation notice that PEFT's get_peft_model triggers at every PEFT build (PEFT's, not ours)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
