"""NeMo loads this file while building LLMRails and calls `init(app)`.

`safecode_guard.nemo.init` checks that the rail has a model (the
`safecode_rail` entry), registers the `safecode` engine that builds it, and
the `safecode_check_input` actions. Nothing is loaded here: the model loads
on the first request.
"""

from safecode_guard.nemo import init

__all__ = ["init"]
