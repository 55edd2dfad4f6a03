"""The graph-model wrapper a DEQ gets for nequip's ``compile_mode: compile``.

It lives in ``nn/`` (not next to the builder) because ``nequip-package`` pickles it into the
package, and everything a packaged module imports is packaged with it: this module imports
only what inference needs.
"""

import warnings

from nequip.nn import GraphModel


class EagerForTrainTimeCompile(GraphModel):
    """What nequip's ``compile_mode: compile`` builds for a DEQ: the eager model, with a
    warning. Tracing for train-time compilation cannot keep the solvers' data-dependent loops
    and the exact implicit training gradient, so the model trains eagerly (the same exact
    gradient, no speed-up). Building it rather than refusing lets ``nequip-package`` package
    a DEQ (it builds every compile mode)."""

    def __init__(self, *args, **kwargs):
        warnings.warn(
            "DEQEquiformerModel does not compile at train time (`compile_mode: compile`): "
            "tracing cannot keep the exact implicit training gradient (a backward fixed-point "
            "solve), so this model runs eagerly. Compile the trained model for deployment with "
            "nequip-compile."
        )
        super().__init__(*args, **kwargs)
